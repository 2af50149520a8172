"""CTranslate2 model directories (``model.bin`` v6, ``config.json``, vocabulary) -> encdec.

``model.bin`` (binary version 6, little-endian) is a header -- ``u32`` version, spec name,
``u32`` spec revision, ``u32`` variable count -- then per variable its name, ``u8`` rank,
``u32`` dims, ``u8`` dtype id (float32, int8, int16, int32, float16, bfloat16), ``u32`` byte
count and the raw bytes, then ``u32`` alias count and ``(alias, target)`` name pairs. Strings
are a ``u16`` length (counting a trailing NUL) and the UTF-8 bytes with the NUL.

The file is memory-mapped; tensors are views into it until converted. Only the Whisper spec is
mapped to an encdec tree (:func:`load_ct2_whisper`): the fused self-attention ``q|k|v`` and
cross-attention ``k|v`` matrices are split, and the key bias CTranslate2 stores as zeros is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from encdec.checkpoints.hf import CheckpointError, read_json, set_path
from encdec.config import ModelConfig, UnsupportedModelError

BINARY_VERSION = 6
_DTYPES: tuple[np.dtype | None, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    None,  # None: bfloat16
)
_DTYPE_NAMES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_MAX_RANK = 8


@dataclasses.dataclass
class Ct2File:
    """The variables of a ``model.bin``: raw arrays (bfloat16 as ``uint16``) and aliases."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def float32(self, name: str) -> np.ndarray:
        """A floating-point variable as float32; quantized integer weights are refused."""
        real = self.aliases.get(name, name)
        dtype, raw = self.dtypes[real], self.variables[real]
        if dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if dtype not in ("float32", "float16"):
            raise UnsupportedModelError(
                f"variable {name!r} is {dtype}: CTranslate2 models quantized to {dtype} are not "
                f"supported (int8, int8_float16, int8_float32, int8_bfloat16, float16, bfloat16 and "
                "float32 are)"
            )
        return raw.astype(np.float32)

    def weight(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """A layer's ``weight``: float32 with no scale, or, saved in int8 (CTranslate2's
        ``int8*`` quantizations), the int8 codes and the per-row scale that dequantizes them
        (CTranslate2 stores its inverse: ``float = int8 / weight_scale``)."""
        real = self.aliases.get(name, name)
        if self.dtypes[real] != "int8":
            return self.float32(name), None
        scale_name = f"{name}_scale"
        if scale_name not in self:
            raise CheckpointError(f"model.bin variable {name!r} is int8 without {scale_name!r}")
        inverse = self.float32(scale_name)
        return self.variables[real], (1.0 / inverse.astype(np.float64)).astype(np.float32)

    def scalar(self, name: str, default: int | None = None) -> int:
        if name not in self:
            if default is None:
                raise CheckpointError(f"model.bin has no {name!r}")
            return default
        return int(np.asarray(self.get(name)).reshape(()))


class _Cursor:
    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path} is truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.buf)}"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"the length of {what}")
        start = self.take(n, what)
        raw = bytes(self.buf[start : start + n])
        if n == 0 or raw[-1] != 0:
            raise CheckpointError(
                f"{self.path} is corrupt: {what} at offset {start} is not a NUL-terminated string"
            )
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path} is corrupt: {what} at offset {start} is not UTF-8") from e
        if not text.isprintable():
            raise CheckpointError(f"{self.path} is corrupt: {what} at offset {start} is {text!r}")
        return text


def read_model_bin(path: str | Path) -> Ct2File:
    """Parse and check a CTranslate2 ``model.bin``; truncation or corruption raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    buf = np.memmap(path, np.uint8, mode="r")
    cur = _Cursor(buf, path)
    version = cur.unpack("I", "the binary version")
    if version != BINARY_VERSION:
        raise CheckpointError(
            f"{path} has binary version {version}; this reader supports CTranslate2's version "
            f"{BINARY_VERSION} (a corrupt file, or one written by another CTranslate2 version)"
        )
    spec = cur.string("the spec name")
    revision = cur.unpack("I", "the spec revision")
    count = cur.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for i in range(count):
        name = cur.string(f"the name of variable {i}")
        rank = cur.unpack("B", f"the rank of {name!r}")
        if rank > _MAX_RANK:
            raise CheckpointError(f"{path} is corrupt: variable {name!r} has rank {rank}")
        dims = tuple(cur.unpack("I", f"the dims of {name!r}") for _ in range(rank))
        type_id = cur.unpack("B", f"the dtype of {name!r}")
        if type_id >= len(_DTYPES):
            raise CheckpointError(f"{path} is corrupt: variable {name!r} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id] or np.dtype("<u2")
        nbytes = cur.unpack("I", f"the byte count of {name!r}")
        if nbytes != math.prod(dims) * dtype.itemsize:
            raise CheckpointError(
                f"{path} is corrupt: variable {name!r} {_DTYPE_NAMES[type_id]}{list(dims)} "
                f"declares {nbytes} bytes, expected {math.prod(dims) * dtype.itemsize}"
            )
        start = cur.take(nbytes, f"the data of {name!r}")
        if name in variables:
            raise CheckpointError(f"{path} is corrupt: variable {name!r} appears twice")
        variables[name] = np.frombuffer(buf, dtype, math.prod(dims), start).reshape(dims)
        dtypes[name] = _DTYPE_NAMES[type_id]
    aliases: dict[str, str] = {}
    for i in range(cur.unpack("I", "the alias count")):
        alias = cur.string(f"alias {i}")
        target = cur.string(f"the target of alias {alias!r}")
        if target not in variables:
            raise CheckpointError(f"{path} is corrupt: alias {alias!r} points to missing variable {target!r}")
        aliases[alias] = target
    if cur.pos != len(buf):
        raise CheckpointError(
            f"{path} is corrupt: {len(buf) - cur.pos} unexpected bytes after the last alias"
        )
    return Ct2File(spec=spec, revision=revision, variables=variables, dtypes=dtypes, aliases=aliases)


def read_vocabulary(directory: str | Path) -> list[str]:
    """The model's tokens by id: ``vocabulary.json`` (a JSON list, newer converters) or
    ``vocabulary.txt`` (one token per ``\\n``-separated line; tokens may hold other line breaks)."""
    directory = Path(directory)
    json_file, txt_file = directory / "vocabulary.json", directory / "vocabulary.txt"
    if json_file.is_file():
        try:
            tokens = json.loads(json_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{json_file} is not valid JSON: {e}") from e
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(f"{json_file} is not a list of tokens")
        return tokens
    if not txt_file.is_file():
        raise CheckpointError(f"{directory} has no vocabulary.json or vocabulary.txt")
    tokens = txt_file.read_bytes().decode("utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return tokens


def has_vocabulary(directory: str | Path) -> bool:
    return any((Path(directory) / f).is_file() for f in ("vocabulary.json", "vocabulary.txt"))


def read_config(path: str | Path) -> dict[str, Any]:
    """A CTranslate2 ``config.json`` ({} when there is none)."""
    path = Path(path)
    if not path.exists():
        return {}
    return read_json(path, "CTranslate2 config")


_CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "swish", 3: "gelu"}


def _num_layers(ct2: Ct2File, stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    found = {int(m.group(1)) for name in ct2.variables if (m := pattern.match(name))}
    if found != set(range(len(found))):
        raise CheckpointError(f"model.bin's {stack} layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def whisper_hf_config(ct2: Ct2File, vocabulary: list[str]) -> dict[str, Any]:
    """The Hugging Face ``config.json`` fields of a CTranslate2 Whisper model, read off its tensors."""
    if ct2.spec != "WhisperSpec":
        raise UnsupportedModelError(f"CTranslate2 spec {ct2.spec!r} is not supported (only WhisperSpec)")
    for name, want in (("decoder/pre_norm", 1), ("decoder/scale_embeddings", 0), ("decoder/alibi", 0)):
        if ct2.scalar(name, want) != want:
            raise UnsupportedModelError(
                f"CTranslate2 Whisper with {name}={ct2.scalar(name)} is not supported"
            )
    act = ct2.scalar("decoder/activation", 3)
    if act not in _CT2_ACTIVATIONS:
        raise UnsupportedModelError(f"CTranslate2 activation id {act} is not supported")
    try:
        V, D = ct2.get("decoder/embeddings/weight").shape
        ids = {tok: i for i, tok in enumerate(vocabulary)}
        eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
        return {
            "model_type": "whisper",
            "vocab_size": V,
            "d_model": D,
            "encoder_layers": _num_layers(ct2, "encoder"),
            "decoder_layers": _num_layers(ct2, "decoder"),
            "encoder_attention_heads": ct2.scalar("encoder/num_heads"),
            "decoder_attention_heads": ct2.scalar("decoder/num_heads"),
            "encoder_ffn_dim": ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
            "decoder_ffn_dim": ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
            "activation_function": _CT2_ACTIVATIONS[act],
            "num_mel_bins": ct2.get("encoder/conv1/weight").shape[1],
            "max_source_positions": ct2.get("encoder/position_encodings/encodings").shape[0],
            "max_target_positions": ct2.get("decoder/position_encodings/encodings").shape[0],
            "pad_token_id": eot,
            "eos_token_id": eot,
            "decoder_start_token_id": sot,
            "tie_word_embeddings": ct2.aliases.get("decoder/projection/weight")
            == "decoder/embeddings/weight",
        }
    except KeyError as e:
        raise CheckpointError(f"CTranslate2 Whisper model lacks {e.args[0]!r}") from e


def whisper_params(ct2: Ct2File, cfg: ModelConfig, *, dtype: Any = np.float32, mesh=None) -> dict[str, Any]:
    """The encdec parameter tree of a CTranslate2 Whisper model (fused projections split); ``mesh``:
    placed on it as read (:func:`encdec.sharding.place_param`)."""
    from encdec.sharding import place_param

    D, N, H = cfg.d_model, cfg.decoder_heads, cfg.head_dim
    used: set[str] = set()
    params: dict[str, Any] = {}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in ct2:
            raise CheckpointError(f"CTranslate2 model.bin is missing {name!r} {shape}")
        array = ct2.float32(name)
        check(name, array, shape)
        return array

    def check(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
        if array.shape != shape:
            raise CheckpointError(f"model.bin variable {name!r} has shape {array.shape}, expected {shape}")
        used.add(ct2.aliases.get(name, name))

    def weight(name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """A weight (rows = output channels), with its per-row scale when saved in int8."""
        if name not in ct2:
            raise CheckpointError(f"CTranslate2 model.bin is missing {name!r} {shape}")
        array, scale = ct2.weight(name)
        check(name, array, shape)
        if scale is not None:
            check(f"{name}_scale", scale, shape[:1])
        return array, scale

    def put(path: tuple, array: np.ndarray) -> None:
        int8 = array.dtype == np.int8
        set_path(params, path, place_param(path, array, None if int8 else dtype, mesh))

    def put_weight(
        path: tuple, array: np.ndarray, scale: np.ndarray | None, out_shape: tuple[int, ...]
    ) -> None:
        """``w`` (and ``w_scale`` in the output dims' shape when int8)."""
        put((*path, "w"), array)
        if scale is not None:
            set_path(
                params,
                (*path, "w_scale"),
                place_param((*path, "w_scale"), scale.reshape(out_shape), None, mesh),
            )

    def norm(ct2_name: str, path: tuple) -> None:
        put((*path, "scale"), get(f"{ct2_name}/gamma", (D,)))
        put((*path, "bias"), get(f"{ct2_name}/beta", (D,)))

    def linear(ct2_name: str, path: tuple, d_in: int, d_out: int) -> None:
        w, scale = weight(f"{ct2_name}/weight", (d_out, d_in))
        put_weight(path, w.T, scale, (d_out,))
        put((*path, "b"), get(f"{ct2_name}/bias", (d_out,)))

    def heads(ct2_name: str, path: tuple, names: tuple[str, ...]) -> None:
        """Split a fused ``[len(names) * D, D]`` projection into per-name ``[D, N, H]`` weights."""
        w, scale = weight(f"{ct2_name}/weight", (len(names) * D, D))
        b = get(f"{ct2_name}/bias", (len(names) * D,))
        for i, name in enumerate(names):
            rows = slice(i * D, (i + 1) * D)
            put_weight(
                (*path, name), w[rows].T.reshape(D, N, H), None if scale is None else scale[rows], (N, H)
            )
            bias = b[rows]
            if name != "k" or np.any(bias):  # Whisper's keys have no bias; CTranslate2 stores zeros
                put((*path, name, "b"), bias.reshape(N, H))

    def out(ct2_name: str, path: tuple) -> None:
        w, scale = weight(f"{ct2_name}/weight", (D, D))
        put_weight((*path, "o"), w.T.reshape(N, H, D), scale, (D,))
        put((*path, "o", "b"), get(f"{ct2_name}/bias", (D,)))

    table, table_scale = weight("decoder/embeddings/weight", (cfg.vocab_size, D))
    put(("shared", "embedding_VD"), table)
    if table_scale is not None:
        put(("shared", "embedding_scale_V"), table_scale)
    if not cfg.tie_word_embeddings:
        w, scale = weight("decoder/projection/weight", (cfg.vocab_size, D))
        put_weight(("lm_head",), w.T, scale, (cfg.vocab_size,))
    for name, c_in in (("conv1", cfg.num_mel_bins), ("conv2", D)):
        w, scale = weight(f"encoder/{name}/weight", (D, c_in, 3))
        put_weight(("encoder", name), w.transpose(2, 1, 0), scale, (D,))
        put(("encoder", name, "b"), get(f"encoder/{name}/bias", (D,)))
    put(
        ("encoder", "pos_embedding_KD"), get("encoder/position_encodings/encodings", (cfg.audio_positions, D))
    )
    put(("decoder", "pos_embedding_KD"), get("decoder/position_encodings/encodings", (cfg.max_positions, D)))
    for stack, n_layers, ffn_dim in (
        ("encoder", cfg.encoder_layers, cfg.encoder_ffn_dim),
        ("decoder", cfg.decoder_layers, cfg.decoder_ffn_dim),
    ):
        norm(f"{stack}/layer_norm", (stack, "final_norm"))
        for i in range(n_layers):
            src, path = f"{stack}/layer_{i}", (stack, "layers", i)
            heads(f"{src}/self_attention/linear_0", (*path, "attn"), ("q", "k", "v"))
            out(f"{src}/self_attention/linear_1", (*path, "attn"))
            norm(f"{src}/self_attention/layer_norm", (*path, "attn_norm"))
            if stack == "decoder":
                heads(f"{src}/attention/linear_0", (*path, "cross_attn"), ("q",))
                heads(f"{src}/attention/linear_1", (*path, "cross_attn"), ("k", "v"))
                out(f"{src}/attention/linear_2", (*path, "cross_attn"))
                norm(f"{src}/attention/layer_norm", (*path, "cross_attn_norm"))
            linear(f"{src}/ffn/linear_0", (*path, "ffn", "wi"), D, ffn_dim)
            linear(f"{src}/ffn/linear_1", (*path, "ffn", "wo"), ffn_dim, D)
            norm(f"{src}/ffn/layer_norm", (*path, "ffn_norm"))
    unused = [n for n, v in ct2.variables.items() if n not in used and v.ndim > 0]
    if unused:
        raise CheckpointError(f"model.bin has tensors encdec does not map: {', '.join(sorted(unused)[:5])}")
    return params


def load_ct2_whisper(
    path: str | Path, *, dtype: Any = np.float32, mesh=None
) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and parameters of a CTranslate2 / faster-whisper model directory."""
    path = Path(path)
    vocabulary = read_vocabulary(path)
    ct2 = read_model_bin(path / "model.bin")
    cfg = ModelConfig.from_hf(whisper_hf_config(ct2, vocabulary))
    if len(vocabulary) != cfg.vocab_size:
        raise CheckpointError(
            f"{path}'s vocabulary has {len(vocabulary)} tokens, the model's embeddings {cfg.vocab_size}"
        )
    return cfg, whisper_params(ct2, cfg, dtype=dtype, mesh=mesh)
