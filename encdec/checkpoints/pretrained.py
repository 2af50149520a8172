"""``load_pretrained``: config, parameters and tokenizer from one local HF directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from encdec.checkpoints.hf import CheckpointError, load_params, read_json
from encdec.config import ModelConfig, UnsupportedModelError
from encdec.models.quant import QuantizationError, check_scheme, is_quantized, quantize_params

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Model:
    """A loaded model: its config, a parameter tree and (when the directory has one) a tokenizer."""

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any = None
    dtype: Any = jnp.float32
    """Activation dtype; params are stored in it too."""
    path: Path | None = None
    quantize: str | None = None
    """``"int8"`` when the weights are int8 (:mod:`encdec.models.quant`); activations stay ``dtype``."""


def resolve_dtype(dtype: Any) -> Any:
    """A dtype name or object as the jnp scalar type; ``"int8"`` is a quantization, not a dtype
    (see :func:`split_dtype`)."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type


def split_dtype(dtype: Any, quantize: str | None = None) -> tuple[Any, str | None]:
    """``(activation dtype, quantization)`` from an experiment's ``dtype`` and ``quantize``:
    ``dtype: int8`` means float32 activations over int8 weights."""
    if isinstance(dtype, str) and dtype == "int8":
        if quantize not in (None, "int8"):
            raise ValueError(f"dtype int8 and quantize {quantize!r} disagree")
        return "float32", "int8"
    return dtype, quantize


def load_pretrained(
    path: str | Path,
    dtype: Any = "float32",
    *,
    tokenizer: bool = True,
    mesh=None,
    quantize: str | None = None,
) -> Model:
    """Load a Hugging Face-layout directory (``config.json`` + weights + optional tokenizer).

    A directory with a ``model.bin`` is read as a CTranslate2 model (Whisper only; see
    ``encdec.checkpoints.ctranslate2``). ``mesh``: a ``jax.sharding.Mesh`` (axes ``data`` and
    ``model``, :func:`encdec.sharding.make_mesh`); each tensor goes straight to its devices, split
    by :mod:`encdec.sharding`'s rules, so no device ever holds the whole model.
    ``quantize="int8"`` (or ``dtype="int8"``): int8 weights, float32 activations
    (:mod:`encdec.models.quant`); a CTranslate2 ``model.bin`` saved in int8 loads as int8 as is.
    """
    dtype, quantize = split_dtype(dtype, quantize)
    if quantize is not None:
        check_scheme(quantize)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if (path / "model.bin").exists():
        return _load_ctranslate2(path, resolve_dtype(dtype), tokenizer, mesh, quantize)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    hf_config = read_json(config_file, "model config")
    generation_file = path / "generation_config.json"
    if hf_config.get("forced_bos_token_id") is None and generation_file.exists():
        # transformers 5 keeps generation defaults (NLLB's and mBART-50's forced language) here.
        forced = read_json(generation_file, "generation config").get("forced_bos_token_id")
        hf_config = {**hf_config, "forced_bos_token_id": forced}
    try:
        cfg = ModelConfig.from_hf(hf_config)
    except UnsupportedModelError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{config_file} is not a usable model config: {type(e).__name__}: {e}") from e
    dtype = resolve_dtype(dtype)
    params = load_params(path, cfg, dtype=jnp.float32 if quantize else dtype, mesh=mesh)
    if quantize:
        params = _quantized(params, quantize, mesh)
    tok = load_tokenizer(path) if tokenizer else None
    return Model(config=cfg, params=params, tokenizer=tok, dtype=dtype, path=path, quantize=quantize)


def quantize_model(model: Model, scheme: str = "int8") -> Model:
    """A copy of ``model`` with int8 weights (the float one is left as it is); an already
    quantized model or an unknown scheme raises :class:`QuantizationError`."""
    check_scheme(scheme)
    if model.quantize is not None or is_quantized(model.params):
        raise QuantizationError(f"the model is already quantized ({model.quantize or 'int8 weights'})")
    params = quantize_params(model.params, scheme)
    return dataclasses.replace(model, params=params, quantize=scheme)


def _quantized(params: dict[str, Any], scheme: str, mesh) -> dict[str, Any]:
    params = quantize_params(params, scheme)
    if mesh is not None:
        from encdec.sharding import shard_params

        params = shard_params(params, mesh)
    return params


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "source.spm")


def load_tokenizer(path: Path):
    """The directory's HF tokenizer, or None when it has no tokenizer files."""
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _load_ctranslate2(path: Path, dtype: Any, tokenizer: bool, mesh, quantize: str | None) -> Model:
    from encdec.checkpoints.ctranslate2 import load_ct2_whisper

    cfg, params = load_ct2_whisper(path, dtype=dtype, mesh=mesh)
    if is_quantized(params):
        quantize = "int8"  # saved in int8 by CTranslate2: kept as it is
    elif quantize:
        params = _quantized(params, quantize, mesh)
    tok = None
    if tokenizer and (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return Model(config=cfg, params=params, tokenizer=tok, dtype=dtype, path=path, quantize=quantize)
