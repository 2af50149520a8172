"""``encdec export --format hf``: a model's parameters as a Hugging Face checkpoint directory.

Every tensor is written under the name :func:`encdec.checkpoints.hf.tensor_specs` reads it
from, laid out back the way HF stores it: each spec's ``layout`` (a transpose, reshape or split
of the HF tensor) is applied to an array of element indices, and the inverse of that
permutation puts encdec's array back in HF order. Loading the written directory therefore
gives back exactly the parameters it was written from, whatever format they were read from
(a CTranslate2 / faster-whisper ``model.bin`` included: that is how Whisper-base becomes a
``WhisperForConditionalGeneration`` that ``transformers`` and ``peft`` load).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from encdec.checkpoints.hf import CheckpointError, tensor_specs
from encdec.checkpoints.pretrained import Model

_COPIED = (
    "tokenizer.json",
    "vocabulary.txt",
    "vocabulary.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
)


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def to_hf_layout(array: np.ndarray, spec) -> np.ndarray:
    """Invert ``spec.layout`` for ``array`` (encdec's layout of the tensor)."""
    size = math.prod(spec.hf_shape)
    order = np.asarray(spec.layout(np.arange(size).reshape(spec.hf_shape)))
    if order.shape != array.shape:
        raise CheckpointError(
            f"parameter {spec.path} has shape {array.shape}, the layout gives {order.shape}"
        )
    flat = np.empty(size, array.dtype)
    flat[order.ravel()] = array.ravel()
    return flat.reshape(spec.hf_shape)


def hf_state_dict(model: Model) -> dict[str, np.ndarray]:
    """Every tensor of the HF checkpoint (float32, HF names with their ``model.`` prefix)."""
    cfg = model.config
    if cfg.model_type != "whisper":
        raise CheckpointError(f"export to HF is implemented for Whisper, not {cfg.model_type}")
    out = {}
    for name, spec in tensor_specs(cfg).items():
        try:
            array = np.asarray(_get(model.params, spec.path), np.float32)
        except (KeyError, IndexError):
            raise CheckpointError(f"the model has no parameter at {spec.path} for {name}") from None
        hf_name = name if name.startswith("proj_out.") else f"model.{name}"
        out[hf_name] = np.ascontiguousarray(to_hf_layout(array, spec))
    return out


def whisper_hf_config(model: Model) -> dict[str, Any]:
    """``config.json`` of a ``WhisperForConditionalGeneration`` with ``model``'s shape and tokens."""
    cfg, path = model.config, Path(model.path)
    if (path / "model.bin").exists():  # CTranslate2: the shape from its tensors, tokens from config.json
        from encdec.checkpoints.ctranslate2 import read_model_bin, read_vocabulary
        from encdec.checkpoints.ctranslate2 import whisper_hf_config as ct2_config

        config = ct2_config(read_model_bin(path / "model.bin"), read_vocabulary(path))
        ct2 = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        config["suppress_tokens"] = ct2.get("suppress_ids", [])
        config["begin_suppress_tokens"] = ct2.get("suppress_ids_begin", [])
        config["bos_token_id"] = config["eos_token_id"]
        # Kept under CTranslate2's names too: with the copied vocabulary.txt, encdec reads the
        # exported directory's special tokens as it read the original's (HF ignores them).
        for key in ("suppress_ids", "suppress_ids_begin", "lang_ids"):
            if key in ct2:
                config[key] = ct2[key]
    else:
        config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="whisper",
        architectures=["WhisperForConditionalGeneration"],
        scale_embedding=False,
        torch_dtype="float32",
        max_source_positions=cfg.audio_positions,
        max_target_positions=cfg.max_positions,
    )
    return config


def export_hf(model: Model, directory: str | Path) -> Path:
    """Write ``model`` as an HF directory (``config.json``, ``model.safetensors``, tokenizer files)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    config = whisper_hf_config(model)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in _COPIED:
        if model.path is not None and (Path(model.path) / name).is_file():
            shutil.copyfile(Path(model.path) / name, directory / name)
    return directory
