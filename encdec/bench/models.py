"""The model of one benchmark entry, whichever way it is given: a named shape or a local checkpoint.

Every system loads the same HF checkpoint directory; the trace draws input ids from the
checkpoint's ordinary tokens (no pad / eos / bos / unk / mask at either end of the vocabulary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from encdec.bench.config import ModelSpec
from encdec.bench.shapes import cache_root, convert_ct2, ct2_dir, get_shape, write_shape


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """Where a benchmark model's checkpoint lies and which token ids its traces may use."""

    label: str
    hf_dir: Path
    token_range: tuple[int, int]
    """``[low, high)`` of ordinary token ids."""
    info: dict[str, Any]
    """What results.json records about the model."""


def resolve_model(spec: ModelSpec, cache_dir: str | Path | None = None) -> BenchModel:
    """Write a shape's checkpoint (once) or check a local one, and find its ordinary token ids."""
    if spec.shape is not None:
        shape = get_shape(spec.shape)
        hf_dir = write_shape(spec.shape, spec.seed, cache_dir)
        info = {
            "shape": spec.shape, "dtype": spec.dtype, "seed": spec.seed, "path": str(hf_dir),
            "family": shape.family, "hf_config": shape.hf_config,
        }
        return BenchModel(spec.label, hf_dir, shape.token_range, info)
    hf_dir = Path(spec.path).expanduser().resolve()
    with open(hf_dir / "config.json") as f:
        hf_config = json.load(f)
    family = hf_config.get("model_type")
    info = {"path": str(hf_dir), "dtype": spec.dtype, "family": family, "hf_config": hf_config}
    return BenchModel(spec.label, hf_dir, checkpoint_token_range(hf_dir, hf_config), info)


def checkpoint_token_range(hf_dir: Path, hf_config: dict[str, Any]) -> tuple[int, int]:
    """Ordinary ids of a real checkpoint: the tokenizer's vocabulary (T5 pads its embedding past
    it) with special ids trimmed from both ends (Marian's pad is its last id, BART's mask too)."""
    high = int(hf_config.get("decoder_vocab_size") or hf_config["vocab_size"])
    specials = {
        v for k, v in hf_config.items()
        if k.endswith("token_id") and isinstance(v, int) and not isinstance(v, bool)
    }
    try:
        import transformers as tf

        tok = tf.AutoTokenizer.from_pretrained(str(hf_dir))
        high = min(high, len(tok))
        specials |= set(tok.all_special_ids)
    except Exception:  # no usable tokenizer: the config's ids are all we know
        pass
    low = 0
    while low in specials:
        low += 1
    while high - 1 in specials and high - 1 > low:
        high -= 1
    if high - low < 2:
        raise ValueError(f"{hf_dir}: no ordinary token ids left in [{low}, {high})")
    return low, high


def ct2_model_dir(spec: ModelSpec, cache_dir: str | Path | None = None) -> Path:
    """The CTranslate2 conversion of a spec's checkpoint, converted once and cached.

    A local checkpoint's conversion is keyed by its path and its files' sizes and mtimes, so an
    edited checkpoint is converted again.
    """
    if spec.shape is not None:
        return ct2_dir(spec.shape, spec.seed, cache_dir)
    hf_dir = Path(spec.path).expanduser().resolve()
    stamp = hashlib.sha1(str(hf_dir).encode())
    for f in sorted(hf_dir.iterdir()):
        st = f.stat()
        stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    final = cache_root(cache_dir) / "local" / f"{hf_dir.name}-{stamp.hexdigest()[:12]}-ct2"
    return convert_ct2(hf_dir, final)
