"""Named model shapes with random weights, written once so every compared system loads the same ones.

A *shape* is a real architecture (``t5-small``, ``bart-large``, ...) with its real dimensions and
vocabulary size but seeded random weights: no downloads, and the throughput of a random model of
a shape is the throughput of the trained one. :func:`write_shape` builds the Hugging Face PyTorch
model, a tokenizer whose vocabulary names every id (CTranslate2 needs one to convert), and saves
both as one HF checkpoint under a cache directory keyed by shape and seed. :func:`ct2_dir`
converts that checkpoint to CTranslate2 once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2
"""Bumped whenever what is written changes, so stale cache entries are not reused."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One named architecture: its family and the HF config fields that differ from the defaults."""

    name: str
    family: str
    """The HF ``model_type``: ``t5``, ``bart``, ``pegasus`` or ``m2m_100`` (NLLB)."""
    hf_config: dict[str, Any]
    """Keyword arguments of the family's transformers config class."""

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def token_range(self) -> tuple[int, int]:
        """``[low, high)`` ids that are ordinary tokens: no pad/eos/bos/unk/mask, no T5 sentinels."""
        if self.family == "t5":
            return 3, min(self.vocab_size, 32100)
        if self.family == "pegasus":
            return 3, self.vocab_size  # pad 0, eos 1, unk 2, as in the T5-style tokenizer
        return 4, self.vocab_size - 1  # BART and NLLB: bos 0, pad 1, eos 2, unk 3, ..., mask


def _t5(d_model, d_kv, d_ff, layers, heads, *, gated=False, vocab=32128) -> dict[str, Any]:
    return dict(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
        num_heads=heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def _bart(d_model, layers, heads, ffn, *, vocab=50265, max_positions=1024) -> dict[str, Any]:
    return dict(
        vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=max_positions,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None,
    )


def _pegasus(d_model, layers, heads, ffn, *, vocab=96103, max_positions=1024) -> dict[str, Any]:
    """google/pegasus-large's options: pre-LN with final norms, sinusoidal positions, scaled embeddings."""
    return dict(
        vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=max_positions,
        activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        scale_embedding=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        forced_eos_token_id=None,
    )


def _nllb(d_model, layers, heads, ffn, *, vocab=256206, max_positions=1024) -> dict[str, Any]:
    """facebook/nllb-200-distilled-600M's options (``m2m_100``): pre-LN, padded sinusoidal positions."""
    return dict(
        vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=max_positions,
        activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, scale_embedding=True, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("t5-small", "t5", _t5(512, 64, 2048, 6, 8)),
        Shape("t5-base", "t5", _t5(768, 64, 3072, 12, 12)),
        Shape("flan-t5-large", "t5", _t5(1024, 64, 2816, 24, 16, gated=True)),
        Shape("bart-base", "bart", _bart(768, 6, 12, 3072)),
        Shape("bart-large", "bart", _bart(1024, 12, 16, 4096)),
        Shape("pegasus-large", "pegasus", _pegasus(1024, 16, 16, 4096)),
        Shape("nllb-600m", "m2m_100", _nllb(1024, 12, 16, 4096)),
        # For tests: a few hundred kilobytes, same families and options.
        Shape("tiny-t5", "t5", _t5(64, 16, 96, 2, 4, vocab=512)),
        Shape("tiny-bart", "bart", _bart(64, 2, 4, 96, vocab=512, max_positions=1024)),
        Shape("tiny-pegasus", "pegasus", _pegasus(64, 2, 4, 96, vocab=512)),
        # Six layers: with two, the random tiny NLLB emitted one token whatever the input.
        Shape("tiny-nllb", "m2m_100", _nllb(64, 6, 4, 96, vocab=512)),
    )
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$ENCDEC_CACHE/shapes``, else ``~/.cache/encdec/shapes``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("ENCDEC_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "encdec") / "shapes"


def shape_dir(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / f"{name}-seed{seed}-v{FORMAT_VERSION}"


def build_hf_model(name: str, seed: int = 0):
    """The random-initialised transformers PyTorch model of a shape (eval mode, float32)."""
    import torch
    import transformers as tf

    shape = get_shape(name)
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration),
        "bart": (tf.BartConfig, tf.BartForConditionalGeneration),
        "pegasus": (tf.PegasusConfig, tf.PegasusForConditionalGeneration),
        "m2m_100": (tf.M2M100Config, tf.M2M100ForConditionalGeneration),
    }[shape.family]
    model = model_cls(config_cls(**shape.hf_config))
    _randomize(model, seed)
    return model.eval()


def _randomize(model, seed: int) -> None:
    """Re-draw every weight so greedy outputs depend on the input.

    With Hugging Face's own init a tied random model copies its input embedding through the
    residual stream and greedy decoding repeats one token (T5: ``<pad>`` for every input), so a
    parity check would compare constants. Here matrices are ``N(0, 1/fan_in)``, embeddings
    ``N(0, 0.1^2)``, norm scales 1 and biases 0; frozen tensors (Pegasus's sinusoidal position
    table) keep their values. Speed does not depend on the values.

    T5 does not scale attention logits by ``d_kv**-0.5``, so its queries are drawn that much
    smaller (as HF's own T5 init does). Unscaled, the 24-layer flan-t5-large shape was chaotic:
    float32 and float64 forward passes agreed on 3% of greedy tokens; scaled, on all of them,
    with logits within 6e-6 of their std (``scripts/random_model_conditioning.py``).
    """
    import torch

    d_kv = getattr(model.config, "d_kv", None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim >= 2:
                std = 0.1 if ("embed" in name or "shared" in name) else p.shape[-1] ** -0.5
                if d_kv is not None and name.endswith(".q.weight"):
                    std *= d_kv**-0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_tokenizer(name: str):
    """A tokenizer naming every id ``0..vocab_size-1`` with the family's special tokens in place."""
    import transformers as tf

    shape = get_shape(name)
    V = shape.vocab_size
    if shape.family in ("t5", "pegasus"):  # pad 0, eos 1, unk 2
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        pieces += [(f"\u2581t{i}", -i / V) for i in range(3, V)]
        return tf.T5Tokenizer(vocab=pieces, extra_ids=0)
    # BART's layout, which NLLB shares (bos 0, pad 1, eos 2, unk 3).
    names = ["<s>", "<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, V - 1)] + ["<mask>"]
    return tf.BartTokenizer(vocab={n: i for i, n in enumerate(names)}, merges=[])


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp directory into place; another process may have won the race."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_shape(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The HF checkpoint directory of a shape (safetensors + config.json + tokenizer), written once."""
    final = shape_dir(name, seed, cache_dir)
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    model = build_hf_model(name, seed)
    model.save_pretrained(str(tmp), safe_serialization=True)
    build_tokenizer(name).save_pretrained(str(tmp))
    _publish(tmp, final)
    return final


def ct2_dir(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The CTranslate2 conversion (float32 weights) of a shape's checkpoint, converted once."""
    hf_dir = write_shape(name, seed, cache_dir)
    return convert_ct2(hf_dir, hf_dir.parent / f"{hf_dir.name}-ct2")


def convert_ct2(hf_dir: Path, final: Path) -> Path:
    """Convert the HF checkpoint ``hf_dir`` to CTranslate2 (float32) at ``final``, unless it is there.

    BART and Pegasus under transformers 5 lack ``normalize_before``, which the converter reads
    (and Pegasus ``normalize_embedding``, which it takes as true when absent): it converts a copy
    whose ``config.json`` states them (BART post-LN; Pegasus pre-LN, no embedding norm). Configs
    with unequal encoder and decoder head counts are refused: CTranslate2's transformer spec
    has one head count for both.
    """
    from ctranslate2.converters import TransformersConverter

    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as src_tmp:
        src = Path(src_tmp)
        for f in hf_dir.iterdir():
            if f.name != "config.json":
                os.symlink(f.resolve(), src / f.name)
        with open(hf_dir / "config.json") as fh:
            config = json.load(fh)
        heads = config.get("encoder_attention_heads"), config.get("decoder_attention_heads")
        if heads[0] != heads[1]:
            raise ValueError(
                f"{hf_dir}: CTranslate2 converts one attention head count for encoder and decoder; "
                f"this model has encoder_attention_heads={heads[0]}, decoder_attention_heads={heads[1]}"
            )
        if config.get("model_type") == "bart":
            config.setdefault("normalize_before", False)
        if config.get("model_type") == "pegasus":
            config.setdefault("normalize_before", True)
            config.setdefault("normalize_embedding", False)
        with open(src / "config.json", "w") as fh:
            json.dump(config, fh, indent=2)
        out = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            TransformersConverter(str(src)).convert(str(out), force=True)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
    _publish(out, final)
    return final


def ct2_vocabulary(ct2_path: str | Path) -> list[str]:
    """Token strings of a converted model, indexed by id."""
    path = Path(ct2_path)
    for fname in ("shared_vocabulary.json", "target_vocabulary.json"):
        if (path / fname).exists():
            with open(path / fname) as f:
                return json.load(f)
    for fname in ("shared_vocabulary.txt", "target_vocabulary.txt"):
        if (path / fname).exists():
            return (path / fname).read_text(encoding="utf-8").split("\n")[:-1]
    raise FileNotFoundError(f"{path} has no CTranslate2 vocabulary file")
