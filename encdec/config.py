"""ModelConfig: one frozen description of every supported encoder-decoder family.

Built from a Hugging Face ``config.json`` by :meth:`ModelConfig.from_hf`. The model code reads
only these fields, never the family name, so a new family is a new ``from_hf`` branch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

Activation = Literal["relu", "gelu", "gelu_new", "silu"]

SUPPORTED_MODEL_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "marian", "pegasus", "m2m_100", "whisper")


class UnsupportedModelError(ValueError):
    """A checkpoint's ``model_type`` or one of its options is not supported."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of an encoder-decoder transformer (hashable: usable as a jit static arg)."""

    model_type: str
    """The Hugging Face ``model_type`` it came from (one of ``SUPPORTED_MODEL_TYPES``; ``m2m_100``
    covers NLLB-200 too)."""
    vocab_size: int
    """Rows of the (encoder) embedding table."""
    d_model: int
    """Width of the residual stream (D)."""
    head_dim: int
    """Per-head width (H) of the decoder's self- and cross-attention (the KV cache's H); T5's
    ``d_kv`` may differ from ``d_model / heads``."""
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    """Decoder self- and cross-attention heads (cross K/V are projected with these)."""
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    activation: Activation
    """FFN nonlinearity: ``relu`` (T5 v1.0), ``gelu_new`` (tanh GELU, T5 v1.1), ``gelu`` (erf, BART),
    ``silu``."""
    gated_ffn: bool
    """Gated FFN (``act(x wi_0) * (x wi_1)``), as in T5 v1.1, mT5, UL2, Flan-T5, ByT5."""
    norm: Literal["rms", "layer"]
    """RMSNorm without bias (T5) or LayerNorm with bias (BART family)."""
    norm_eps: float
    pre_norm: bool
    """Pre-LayerNorm residual blocks (T5, mBART) or post-LayerNorm (BART, Marian)."""
    final_norm: bool
    """A norm after the last encoder and decoder layer (T5, mBART)."""
    embedding_norm: bool
    """BART's ``layernorm_embedding`` after token + position embeddings."""
    position: Literal["relative", "learned", "sinusoidal", "padded_sinusoidal"]
    """T5 relative bias; BART learned positions (offset 2); Marian and Pegasus sinusoidal positions
    (sines then cosines, from row 0); M2M100/NLLB ``padded_sinusoidal``: fairseq's table read from
    row ``pad_token_id + 1``, with pad tokens on the all-zero row ``pad_token_id`` and not
    counted (an encoder position is the number of non-pad tokens before it)."""
    max_positions: int
    """Positions the learned/sinusoidal table covers; unbounded (relative) is reported as a large value."""
    relative_num_buckets: int
    relative_max_distance: int
    attention_scale: bool
    """Scale queries by ``head_dim ** -0.5`` (BART family); T5 folds it into its init."""
    projection_bias: bool
    """Attention and FFN projections have biases (BART family)."""
    embed_scale: float
    """Multiplier on token embeddings (``sqrt(d_model)`` when ``scale_embedding``)."""
    tie_word_embeddings: bool
    """The LM head is the (decoder) embedding table."""
    tied_output_rescale: bool
    """Scale decoder output by ``d_model ** -0.5`` before a tied head (T5)."""
    final_logits_bias: bool
    """A learned bias on the logits (BART family)."""
    shared_decoder_embeddings: bool
    """Encoder and decoder share one embedding table (False only for some Marian models)."""
    decoder_vocab_size: int
    """Rows of the decoder embedding table and the LM head."""
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int
    learned_position_offset: int = 2
    """Rows of a learned position table before position 0 (BART family 2, Whisper 0)."""
    num_mel_bins: int = 0
    """Audio encoders (Whisper): log-mel channels the conv stem reads; 0 for text encoders."""
    audio_positions: int = 0
    """Audio encoders: encoder positions after the stride-2 conv stem (Whisper: 1500 for 30 s); else 0."""
    encoder_head_dim: int = 0
    """Per-head width of the encoder's self-attention; 0 means ``head_dim``. BART-family configs
    may give the encoder and decoder different head counts (``d_model / heads`` each)."""
    relative_bias_per_layer: bool = False
    """Every self-attention layer has its own relative-bias table (UMT5) instead of all layers
    sharing layer 0's (T5, mT5)."""
    float16_residual_in_float32: bool = False
    """Under float16, keep the residual stream and the FFN output projection's result in float32.
    T5-family activations outgrow float16's range (65,504) in the FFN output and the residual
    sum; HF keeps ``wo`` in float32 for the same reason, which also turns its residual float32."""
    forced_bos_token_id: int | None = None
    """The token HF ``generate`` forces right after the start token (a target-language code for
    NLLB/M2M100/mBART-50, ``<s>`` for BART-large-CNN), when the checkpoint names one; None otherwise.
    Informational: a request forces it with ``Request.forced_bos_token_id`` (HF's semantics, part
    of the output) or ``decoder_prefix=[start, token]`` (not part of the output)."""

    def __post_init__(self):
        if not self.encoder_head_dim:
            object.__setattr__(self, "encoder_head_dim", self.head_dim)

    @property
    def is_t5(self) -> bool:
        return self.position == "relative"

    @property
    def is_audio(self) -> bool:
        """The encoder reads log-mel features (``encdec.models.whisper.encode_audio``), not tokens."""
        return self.num_mel_bins > 0

    @property
    def max_source_positions(self) -> int:
        return self.audio_positions or self.max_positions

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; unsupported options raise."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type in ("t5", "mt5", "umt5"):
            return _from_t5(hf)
        if model_type == "whisper":
            return _from_whisper(hf)
        return _from_bart_family(hf)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        with open(path) as f:
            return cls.from_hf(json.load(f))


def _first_id(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _optional_id(value: Any) -> int | None:
    return None if value is None else int(value)


def _from_t5(hf: dict[str, Any]) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-", 1)[1] if gated else proj
    act = {"gelu": "gelu_new" if gated else "gelu"}.get(act, act)
    if act not in ("relu", "gelu", "gelu_new", "silu"):
        raise UnsupportedModelError(f"T5 option feed_forward_proj={proj!r} is not supported")
    if hf.get("is_gated_act") is not None and bool(hf["is_gated_act"]) != gated:
        raise UnsupportedModelError(f"T5 option is_gated_act={hf['is_gated_act']} contradicts {proj!r}")
    layers = int(hf["num_layers"])
    tie = bool(hf.get("tie_word_embeddings", True))
    # Original T5 rescales before its tied head, v1.1 (saved with tie_word_embeddings=false) does
    # not; transformers 5 always ties and records the rescale as `scale_decoder_outputs`. UMT5
    # follows the same rule; mT5 never rescales.
    rescale = bool(hf.get("scale_decoder_outputs", tie)) and hf["model_type"] in ("t5", "umt5")
    return ModelConfig(
        model_type=hf["model_type"],
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["d_model"]),
        head_dim=int(hf["d_kv"]),
        encoder_layers=layers,
        decoder_layers=int(hf.get("num_decoder_layers") or layers),
        encoder_heads=int(hf["num_heads"]),
        decoder_heads=int(hf["num_heads"]),
        encoder_ffn_dim=int(hf["d_ff"]),
        decoder_ffn_dim=int(hf["d_ff"]),
        activation=act,
        gated_ffn=gated,
        norm="rms",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        pre_norm=True,
        final_norm=True,
        embedding_norm=False,
        position="relative",
        max_positions=1 << 20,
        relative_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        attention_scale=False,
        projection_bias=False,
        embed_scale=1.0,
        tie_word_embeddings=tie,
        tied_output_rescale=rescale,
        final_logits_bias=False,
        shared_decoder_embeddings=True,
        decoder_vocab_size=int(hf["vocab_size"]),
        pad_token_id=int(hf.get("pad_token_id", 0)),
        eos_token_id=_first_id(hf.get("eos_token_id", 1)),
        decoder_start_token_id=int(hf.get("decoder_start_token_id", hf.get("pad_token_id", 0))),
        relative_bias_per_layer=hf["model_type"] == "umt5",
        float16_residual_in_float32=True,
        forced_bos_token_id=_optional_id(hf.get("forced_bos_token_id")),
    )


_BART_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "swish": "silu", "silu": "silu", "gelu_new": "gelu_new"}


# What sets the BART-like families apart (HF's code decides, whatever `normalize_before` says):
# pre-LN with final norms, BART's `layernorm_embedding`, positions, a `final_logits_bias`.
_BART_LIKE = {
    #           pre_norm, embedding_norm, position, final_logits_bias
    "bart": (False, True, "learned", True),
    "mbart": (True, True, "learned", True),
    "marian": (False, False, "sinusoidal", True),
    "pegasus": (True, False, "sinusoidal", True),
    "m2m_100": (True, False, "padded_sinusoidal", False),
    "whisper": (False, True, "learned", True),  # replaced by _from_whisper
}


def _from_bart_family(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    act = hf.get("activation_function", "gelu")
    if act not in _BART_ACTIVATIONS:
        raise UnsupportedModelError(f"{model_type} option activation_function={act!r} is not supported")
    d_model = int(hf["d_model"])
    enc_heads, dec_heads = int(hf["encoder_attention_heads"]), int(hf["decoder_attention_heads"])
    for side, heads in (("encoder", enc_heads), ("decoder", dec_heads)):
        if heads <= 0 or d_model % heads:
            # HF's attention modules raise on this too: head_dim is d_model / heads.
            raise UnsupportedModelError(
                f"{model_type}: d_model={d_model} is not divisible by {side}_attention_heads={heads}"
            )
    pre_norm, embedding_norm, position, logits_bias = _BART_LIKE[model_type]
    vocab = int(hf["vocab_size"])
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    eos = _first_id(hf.get("eos_token_id", 2))
    pad = int(hf.get("pad_token_id", 1))
    start = hf.get("decoder_start_token_id")
    if start is None:
        start = pad if model_type in ("marian", "pegasus") else eos
    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab,
        d_model=d_model,
        head_dim=d_model // dec_heads,
        encoder_head_dim=d_model // enc_heads,
        encoder_layers=int(hf["encoder_layers"]),
        decoder_layers=int(hf["decoder_layers"]),
        encoder_heads=enc_heads,
        decoder_heads=dec_heads,
        encoder_ffn_dim=int(hf["encoder_ffn_dim"]),
        decoder_ffn_dim=int(hf["decoder_ffn_dim"]),
        activation=_BART_ACTIVATIONS[act],
        gated_ffn=False,
        norm="layer",
        norm_eps=1e-5,
        pre_norm=pre_norm,
        final_norm=pre_norm,
        embedding_norm=embedding_norm,
        position=position,
        max_positions=int(hf.get("max_position_embeddings", 1024)),
        relative_num_buckets=0,
        relative_max_distance=0,
        attention_scale=True,
        projection_bias=True,
        embed_scale=math.sqrt(d_model) if hf.get("scale_embedding", False) else 1.0,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        tied_output_rescale=False,
        final_logits_bias=logits_bias,
        shared_decoder_embeddings=shared,
        decoder_vocab_size=int(hf.get("decoder_vocab_size") or vocab),
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=int(start),
        forced_bos_token_id=_optional_id(hf.get("forced_bos_token_id")),
    )


def _from_whisper(hf: dict[str, Any]) -> ModelConfig:
    """Whisper: pre-LN BART-like decoder (learned positions from row 0, no ``k`` bias, tied head)
    over an audio encoder; the encoder itself is ``encdec.models.whisper.encode_audio``."""
    hf = {"vocab_size": 51865, "eos_token_id": 50257, "decoder_start_token_id": 50258, **hf}
    base = _from_bart_family(hf)  # the shared checks and dimensions
    pad = hf.get("pad_token_id")
    return dataclasses.replace(
        base,
        pre_norm=True,
        final_norm=True,
        embedding_norm=False,
        max_positions=int(hf.get("max_target_positions", 448)),
        # HF computes `embed_scale` from `scale_embedding` but never applies it; neither do we.
        embed_scale=1.0,
        final_logits_bias=False,
        shared_decoder_embeddings=True,
        decoder_vocab_size=base.vocab_size,
        pad_token_id=int(pad if pad is not None else base.eos_token_id),
        learned_position_offset=0,
        num_mel_bins=int(hf.get("num_mel_bins", 80)),
        audio_positions=int(hf.get("max_source_positions", 1500)),
    )
