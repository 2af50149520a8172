"""Hugging Face checkpoints -> encdec parameter trees.

Each family's tensor names are listed once in :func:`tensor_specs` with the expected HF shape
and how to lay the tensor out for encdec (see ``encdec.models.transformer`` for the tree).
Tensors are read one at a time (memory-mapped safetensors or ``torch.load(mmap=True)``), so
loading needs about the checkpoint's size plus one tensor of host memory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from encdec.config import ModelConfig
from encdec.models.layers import padded_sinusoidal_table, sinusoidal_table


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


def regular_file(path: Path, what: str = "file") -> Path:
    """``path`` if it is a regular file; a FIFO, device or folder under that name is refused
    (opening a FIFO would block forever)."""
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file")
    return path


def read_json(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from a regular file; unreadable, non-UTF-8, invalid or non-object JSON
    raises :class:`CheckpointError` naming the file."""
    regular_file(path, what)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a JSON {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    path: tuple[Any, ...]
    """Where the tensor goes in the parameter tree."""
    hf_shape: tuple[int, ...]
    layout: Callable[[np.ndarray], np.ndarray]
    aliases: tuple[str, ...] = ()
    """Other names a tied tensor may be saved under."""
    if_absent: str = "error"
    """``"error"``, ``"zeros"`` (HF's BART family tolerates a missing ``final_logits_bias`` the
    same way) or ``"skip"`` (see :func:`_settle_embeddings`)."""


def as_is(x):
    """A tensor laid out as HF stores it."""
    return x


def _transpose(x):
    return x.T


def _row(x):
    return x.reshape(-1)


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor the checkpoint must hold, by its HF name (without the ``model.`` prefix)."""
    if cfg.is_t5:
        return _t5_specs(cfg)
    if cfg.model_type == "whisper":
        from encdec.checkpoints.whisper_hf import whisper_specs

        return whisper_specs(cfg)
    return _bart_specs(cfg)


def attention_specs(specs, hf, path, cfg, heads, bias, names, head_dim=None):
    """Add an attention block's q/k/v/o tensors (HF names ``names``) as heads-split projections
    of ``heads`` heads, ``head_dim`` wide (the decoder's ``cfg.head_dim`` by default)."""
    D, N, H = cfg.d_model, heads, head_dim or cfg.head_dim

    def qkv(x):
        return x.T.reshape(D, N, H)

    def out(x):
        return x.T.reshape(N, H, D)

    q, k, v, o = names
    for ours, name in (("q", q), ("k", k), ("v", v)):
        specs[f"{hf}.{name}.weight"] = TensorSpec((*path, ours, "w"), (N * H, D), qkv)
        if bias:
            specs[f"{hf}.{name}.bias"] = TensorSpec((*path, ours, "b"), (N * H,), lambda x: x.reshape(N, H))
    specs[f"{hf}.{o}.weight"] = TensorSpec((*path, "o", "w"), (D, N * H), out)
    if bias:
        specs[f"{hf}.{o}.bias"] = TensorSpec((*path, "o", "b"), (D,), as_is)


def norm_specs(specs, hf, path, cfg):
    """Add a norm's scale (and, for LayerNorm, its bias)."""
    specs[f"{hf}.weight"] = TensorSpec((*path, "scale"), (cfg.d_model,), as_is)
    if cfg.norm == "layer":
        specs[f"{hf}.bias"] = TensorSpec((*path, "bias"), (cfg.d_model,), as_is)


def linear_specs(specs, hf, path, d_in, d_out, bias):
    """Add a dense layer's weight (transposed to ``[d_in, d_out]``) and optional bias."""
    specs[f"{hf}.weight"] = TensorSpec((*path, "w"), (d_out, d_in), _transpose)
    if bias:
        specs[f"{hf}.bias"] = TensorSpec((*path, "b"), (d_out,), as_is)


def _t5_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    V, D = cfg.vocab_size, cfg.d_model
    specs["shared.weight"] = TensorSpec(
        ("shared", "embedding_VD"),
        (V, D),
        as_is,
        ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    )
    qkvo = ("q", "k", "v", "o")
    for stack, n_layers, heads, head_dim, ffn_dim in (
        ("encoder", cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_head_dim, cfg.encoder_ffn_dim),
        ("decoder", cfg.decoder_layers, cfg.decoder_heads, cfg.head_dim, cfg.decoder_ffn_dim),
    ):
        for i in range(n_layers if cfg.relative_bias_per_layer else 1):
            # T5 and mT5: layer 0's table serves every layer; UMT5: every layer has its own.
            where = (stack, "layers", i) if cfg.relative_bias_per_layer else (stack,)
            specs[f"{stack}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"] = TensorSpec(
                (*where, "rel_bias_NR"), (cfg.relative_num_buckets, heads), _transpose
            )
        for i in range(n_layers):
            blk, path = f"{stack}.block.{i}.layer", (stack, "layers", i)
            attention_specs(
                specs, f"{blk}.0.SelfAttention", (*path, "attn"), cfg, heads, False, qkvo, head_dim
            )
            norm_specs(specs, f"{blk}.0.layer_norm", (*path, "attn_norm"), cfg)
            ffn = 1
            if stack == "decoder":
                cross = (*path, "cross_attn")
                attention_specs(specs, f"{blk}.1.EncDecAttention", cross, cfg, heads, False, qkvo)
                norm_specs(specs, f"{blk}.1.layer_norm", (*path, "cross_attn_norm"), cfg)
                ffn = 2
            names = ("wi_0", "wi_1") if cfg.gated_ffn else ("wi",)
            for name in names:
                dense = f"{blk}.{ffn}.DenseReluDense.{name}"
                linear_specs(specs, dense, (*path, "ffn", name), D, ffn_dim, False)
            linear_specs(specs, f"{blk}.{ffn}.DenseReluDense.wo", (*path, "ffn", "wo"), ffn_dim, D, False)
            norm_specs(specs, f"{blk}.{ffn}.layer_norm", (*path, "ffn_norm"), cfg)
        norm_specs(specs, f"{stack}.final_layer_norm", (stack, "final_norm"), cfg)
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec(("lm_head", "w"), (V, D), _transpose)
    return specs


def _bart_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    V, D = cfg.vocab_size, cfg.d_model
    enc_alias = ("encoder.embed_tokens.weight",)
    dec_alias = ("decoder.embed_tokens.weight",)
    if cfg.shared_decoder_embeddings and not cfg.tie_word_embeddings:
        # transformers 5 unties every table when tie_word_embeddings is false: `shared`, the
        # encoder's and the decoder's embed_tokens may then all differ (older files hold copies).
        for name, where in (
            ("shared.weight", "shared"),
            ("encoder.embed_tokens.weight", "encoder"),
            ("decoder.embed_tokens.weight", "decoder"),
        ):
            specs[name] = TensorSpec((where, "embedding_VD"), (V, D), as_is, if_absent="skip")
    elif cfg.shared_decoder_embeddings:
        head_alias = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        specs["shared.weight"] = TensorSpec(
            ("shared", "embedding_VD"), (V, D), as_is, enc_alias + dec_alias + head_alias
        )
    else:
        specs["encoder.embed_tokens.weight"] = TensorSpec(
            ("shared", "embedding_VD"), (V, D), as_is, ("shared.weight",)
        )
        head_alias = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        specs["decoder.embed_tokens.weight"] = TensorSpec(
            ("decoder", "embedding_VD"), (cfg.decoder_vocab_size, D), as_is, head_alias
        )
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec(("lm_head", "w"), (cfg.decoder_vocab_size, D), _transpose)
    if cfg.final_logits_bias:
        specs["final_logits_bias"] = TensorSpec(
            ("final_logits_bias_V",), (1, cfg.decoder_vocab_size), _row, if_absent="zeros"
        )
    qkvo = ("q_proj", "k_proj", "v_proj", "out_proj")
    for stack, n_layers, heads, head_dim, ffn_dim in (
        ("encoder", cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_head_dim, cfg.encoder_ffn_dim),
        ("decoder", cfg.decoder_layers, cfg.decoder_heads, cfg.head_dim, cfg.decoder_ffn_dim),
    ):
        if cfg.position == "learned":
            specs[f"{stack}.embed_positions.weight"] = TensorSpec(
                (stack, "pos_embedding_KD"), (cfg.max_positions + 2, D), as_is
            )
        if cfg.embedding_norm:
            norm_specs(specs, f"{stack}.layernorm_embedding", (stack, "embed_norm"), cfg)
        if cfg.final_norm:
            norm_specs(specs, f"{stack}.layer_norm", (stack, "final_norm"), cfg)
        for i in range(n_layers):
            hf, path = f"{stack}.layers.{i}", (stack, "layers", i)
            attention_specs(specs, f"{hf}.self_attn", (*path, "attn"), cfg, heads, True, qkvo, head_dim)
            norm_specs(specs, f"{hf}.self_attn_layer_norm", (*path, "attn_norm"), cfg)
            if stack == "decoder":
                attention_specs(specs, f"{hf}.encoder_attn", (*path, "cross_attn"), cfg, heads, True, qkvo)
                norm_specs(specs, f"{hf}.encoder_attn_layer_norm", (*path, "cross_attn_norm"), cfg)
            linear_specs(specs, f"{hf}.fc1", (*path, "ffn", "wi"), D, ffn_dim, True)
            linear_specs(specs, f"{hf}.fc2", (*path, "ffn", "wo"), ffn_dim, D, True)
            norm_specs(specs, f"{hf}.final_layer_norm", (*path, "ffn_norm"), cfg)
    return specs


# Tensors a checkpoint may carry that encdec recomputes or does not use (older T5/UMT5 files
# hold an unused cross-attention bias table).
_IGNORED_SUFFIXES = (
    "embed_positions.weight",
    "embed_positions._float_tensor",
    "layer.1.EncDecAttention.relative_attention_bias.weight",
)


def _checkpoint_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return [regular_file(single, "weights file")]
    if index.exists():
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
        shards = []
        for name in sorted(set(weight_map.values())):
            # Judged by the name as written, not where a link points: the HF hub cache's
            # snapshot files are symlinks into ../../blobs.
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
                raise CheckpointError(f"{index} names shard {name!r}, outside the model directory {path}")
            shard = path / name
            if not shard.exists():
                raise CheckpointError(f"{index} names shard(s) that are missing: {name}")
            shards.append(regular_file(shard, "shard"))
        return shards
    bin_file = path / "pytorch_model.bin"
    if bin_file.exists():
        return [regular_file(bin_file, "weights file")]
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """``(name, load)`` pairs over every tensor of the checkpoint; ``load`` reads one tensor."""
    for file in _checkpoint_files(path):
        if file.suffix == ".safetensors":
            yield from _iter_safetensors(file)
        else:
            yield from _iter_torch_bin(file)


def _iter_safetensors(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), framework="numpy")
        keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from e
    with handle:
        for key in keys:
            yield key, _safetensors_reader(handle, key, file)


def _safetensors_reader(handle, key, file):
    def load():
        try:
            return handle.get_tensor(key)
        except TypeError:  # bfloat16 has no numpy dtype: go through torch
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as pt:
                return pt.get_tensor(key).float().numpy()
        except Exception as e:  # noqa: BLE001 - any read failure is a bad file
            raise CheckpointError(f"cannot read tensor {key!r} from {file}: {e}") from e

    return load


def _iter_torch_bin(file: Path):
    import torch

    try:
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"cannot read {file}: {e} (truncated or not a PyTorch checkpoint?)") from e
    for key, tensor in state.items():
        yield key, (lambda t=tensor: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())


def _canonical(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def load_params(
    path: str | Path, cfg: ModelConfig, *, dtype: Any = np.float32, mesh=None
) -> dict[str, Any]:
    """Read and check every tensor; return the encdec tree as ``jax.Array``s of ``dtype``.

    ``mesh``: place each tensor by :mod:`encdec.sharding`'s rules as it is read, each device
    receiving only its block (host memory still holds one tensor at a time).
    """
    from encdec.sharding import place_param

    path = Path(path)
    specs = tensor_specs(cfg)
    by_alias = {alias: name for name, spec in specs.items() for alias in spec.aliases}
    params: dict[str, Any] = {}
    found: set[str] = set()
    for raw_name, load in iter_tensors(path):
        name = _canonical(raw_name)
        name = name if name in specs else by_alias.get(name, name)
        if name not in specs:
            if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                continue
            raise CheckpointError(f"unexpected tensor {raw_name!r} in {path} for a {cfg.model_type} config")
        if name in found:
            continue  # a tied alias of a tensor already read
        spec = specs[name]
        array = load()
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(
                f"tensor {raw_name!r} in {path} has dtype {array.dtype}: weights must be floating point"
            )
        if tuple(array.shape) != spec.hf_shape:
            raise CheckpointError(
                f"tensor {raw_name!r} has shape {tuple(array.shape)}, "
                f"expected {spec.hf_shape} from the config"
            )
        set_path(params, spec.path, place_param(spec.path, spec.layout(array), dtype, mesh))
        found.add(name)
    for name, spec in specs.items():
        if spec.if_absent == "zeros" and name not in found:
            zeros = spec.layout(np.zeros(spec.hf_shape))
            set_path(params, spec.path, place_param(spec.path, zeros, dtype, mesh))
    missing = [n for n, spec in specs.items() if n not in found and spec.if_absent == "error"]
    if missing:
        shown = ", ".join(f"{n} {specs[n].hf_shape}" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {shown}{more}")
    _settle_embeddings(params, path)
    add_position_tables(params, cfg, dtype, mesh=mesh)
    return params


def _settle_embeddings(params: dict[str, Any], path: Path) -> None:
    """Untied BART-family tables: ``shared`` from whichever was saved; a stack's own table is
    kept only where it differs from ``shared`` (equal copies share one array)."""
    shared = params.setdefault("shared", {})
    stacks = [params.get(s, {}) for s in ("encoder", "decoder")]
    if "embedding_VD" not in shared:
        tables = [s["embedding_VD"] for s in stacks if "embedding_VD" in s]
        if not tables:
            raise CheckpointError(
                f"checkpoint {path} has no token embeddings (shared.weight or embed_tokens)"
            )
        shared["embedding_VD"] = tables[0]
    table_VD = shared["embedding_VD"]
    for stack in stacks:
        own = stack.get("embedding_VD")
        if own is not None and own.shape == table_VD.shape and bool((own == table_VD).all()):
            del stack["embedding_VD"]


def add_position_tables(
    params: dict[str, Any], cfg: ModelConfig, dtype: Any = np.float32, *, mesh=None
) -> None:
    """Put the computed (sinusoidal) position tables in ``params``; checkpoints do not hold them.
    ``mesh``: placed on it by :mod:`encdec.sharding`'s rules (replicated), like the read tensors."""
    from encdec.sharding import place_param

    if cfg.position == "sinusoidal":
        table = sinusoidal_table(cfg.max_positions, cfg.d_model)
    elif cfg.position == "padded_sinusoidal":
        table = padded_sinusoidal_table(cfg.max_positions, cfg.d_model, cfg.pad_token_id)
    else:
        return
    table = place_param(("pos_embedding_KD",), table, dtype, mesh)
    params["encoder"]["pos_embedding_KD"] = table
    params["decoder"]["pos_embedding_KD"] = table


def set_path(tree: dict, path: tuple, value) -> None:
    """Put ``value`` at ``path`` in a nested dict/list tree, creating what is missing."""
    node = tree
    for key, nxt in zip(path[:-1], path[1:], strict=False):
        if isinstance(key, int):
            while len(node) <= key:
                node.append({} if not isinstance(nxt, int) else [])
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    node[path[-1]] = value
