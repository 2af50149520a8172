"""``load_pretrained``: config, parameters and tokenizer from one local HF directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from encdec.checkpoints.hf import CheckpointError, load_params, read_json
from encdec.config import ModelConfig, UnsupportedModelError

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


def resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type


def load_pretrained(path: str | Path, dtype: Any = "float32", *, tokenizer: bool = True, mesh=None) -> Model:
    """Load a Hugging Face-layout directory (``config.json`` + weights + optional tokenizer).

    A directory with a ``model.bin`` is read as a CTranslate2 model (Whisper only; see
    ``encdec.checkpoints.ctranslate2``). ``mesh``: a ``jax.sharding.Mesh`` (axes ``data`` and
    ``model``, :func:`encdec.sharding.make_mesh`); each tensor goes straight to its devices, split
    by :mod:`encdec.sharding`'s rules, so no device ever holds the whole model.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if (path / "model.bin").exists():
        return _load_ctranslate2(path, resolve_dtype(dtype), tokenizer, mesh)
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
    params = load_params(path, cfg, dtype=dtype, mesh=mesh)
    tok = load_tokenizer(path) if tokenizer else None
    return Model(config=cfg, params=params, tokenizer=tok, dtype=dtype, path=path)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "source.spm")


def load_tokenizer(path: Path):
    """The directory's HF tokenizer, or None when it has no tokenizer files."""
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _load_ctranslate2(path: Path, dtype: Any, tokenizer: bool, mesh) -> Model:
    from encdec.checkpoints.ctranslate2 import load_ct2_whisper

    cfg, params = load_ct2_whisper(path, dtype=dtype, mesh=mesh)
    tok = None
    if tokenizer and (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return Model(config=cfg, params=params, tokenizer=tok, dtype=dtype, path=path)
