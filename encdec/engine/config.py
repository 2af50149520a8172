"""EngineConfig: the fixed shapes and policies of one engine (frozen, hashable)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How an :class:`~encdec.engine.Engine` batches, caches and schedules.

    Every shape inside the jitted steps comes from here, so one config compiles a fixed set of
    functions: one decode step and one encode step per encoder length bucket.
    """

    num_slots: int = 8
    """Decode slots (B): sequences decoded together by every decode step."""
    page_size: int = 16
    """Tokens per KV page (G), for both pools."""
    max_encoder_len: int = 512
    """Longest input accepted (tokens); also the largest encoder bucket. Audio models ignore it
    (and ``encoder_buckets``): their encoder always has ``ModelConfig.audio_positions`` (1,500)
    positions, one bucket, and the default cross pool is sized for that."""
    max_new_tokens: int = 128
    """Largest ``max_new_tokens`` a request may ask for; sizes the self page tables."""
    num_self_pages: int | None = None
    """Pages in the self-attention pool (sentinel included). None: from ``memory_budget_bytes``,
    else enough for every slot at ``max_new_tokens``."""
    num_cross_pages: int | None = None
    """Pages in the cross-attention pool (sentinel included); None as for ``num_self_pages``."""
    memory_budget_bytes: int | None = None
    """KV cache budget split by ``cross_kv_fraction``, used when page counts are not given."""
    cross_kv_fraction: float = 0.5
    """Share of ``memory_budget_bytes`` for cross-attention pages (TensorRT-LLM's
    ``cross_kv_cache_fraction``)."""
    encoder_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    """Encoder input lengths are padded up to the next bucket (one compile per bucket);
    buckets above ``max_encoder_len`` are dropped and ``max_encoder_len`` is always one."""
    max_encoder_batch: int = 8
    """Most requests in one encoder batch."""
    max_encoder_tokens: int = 4096
    """Most padded tokens (rows x bucket) in one encoder batch."""
    steps_per_dispatch: int = 4
    """Most decode steps per jitted call (a device-side loop): fewer host round trips. A dispatch
    is cut short where a slot's ``max_new_tokens`` ends while requests wait, so such a slot is
    refilled at once; a slot ending at EOS idles until the next dispatch ends."""
    attention_impl: Literal["auto", "pallas", "xla", "window"] = "auto"
    """Decode attention: ``pallas`` (the paged kernel), ``xla`` (its pure-JAX reference, pages
    gathered every step) or ``window`` (pages gathered once per dispatch into a dense copy,
    :mod:`encdec.cache.window_kv`). ``auto`` is ``pallas`` on GPU and ``window`` elsewhere."""
    mode: Literal["inflight", "static"] = "inflight"
    """``inflight`` refills a slot as soon as its sequence ends; ``static`` starts a batch only
    when every slot is free, so the batch ends with its longest member (for comparison)."""
    max_stop_tokens: int = 4
    """Most per-request stop token ids (besides EOS)."""
    max_decoder_prefix: int | None = None
    """Most forced decoder tokens a request starts with (``Request.decoder_prefix``, the start
    token included). None: 1 for text models, the length of Whisper's default prompt (4) for
    audio models. Self page tables hold ``max_decoder_prefix - 1 + max_new_tokens`` tokens."""
    truncate_long_inputs: bool = False
    """Truncate inputs longer than ``max_encoder_len`` instead of rejecting them."""
    cache_dtype: str | None = None
    """KV cache dtype; None: float32 on CPU (XLA:CPU scatters into bfloat16 slowly), else the model's."""

    def __post_init__(self):
        for name in (
            "num_slots",
            "page_size",
            "max_encoder_len",
            "max_new_tokens",
            "max_encoder_batch",
            "max_encoder_tokens",
            "steps_per_dispatch",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_decoder_prefix is not None and self.max_decoder_prefix <= 0:
            raise ValueError(
                f"EngineConfig.max_decoder_prefix must be positive, got {self.max_decoder_prefix}"
            )
        if not 0 < self.cross_kv_fraction < 1:
            raise ValueError(
                f"EngineConfig.cross_kv_fraction must be in (0, 1), got {self.cross_kv_fraction}"
            )
        if self.mode not in ("inflight", "static"):
            raise ValueError(f"EngineConfig.mode must be 'inflight' or 'static', got {self.mode!r}")
        if self.attention_impl not in ("auto", "pallas", "xla", "window"):
            raise ValueError(
                "EngineConfig.attention_impl must be auto, pallas, xla or window, "
                f"got {self.attention_impl!r}"
            )
        buckets = sorted(
            {b for b in self.encoder_buckets if 0 < b < self.max_encoder_len} | {self.max_encoder_len}
        )
        object.__setattr__(self, "encoder_buckets", tuple(buckets))

    def bucket_for(self, length: int) -> int:
        return next(b for b in self.encoder_buckets if b >= length)

    def encoder_batch_rows(self, bucket: int) -> int:
        """Static row count of the encoder batch for ``bucket``."""
        return max(1, min(self.max_encoder_batch, self.max_encoder_tokens // bucket))
