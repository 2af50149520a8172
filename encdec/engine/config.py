"""EngineConfig: the fixed shapes and policies of one engine (frozen, hashable)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from encdec.engine.validation import FieldError, Float, Int, Ints, OneOf, check_fields, rule

DEFAULT_MAX_NEW_TOKENS = 32
"""``max_new_tokens`` of a text request that does not set it (capped at the engine's limit)."""

_INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How an :class:`~encdec.engine.Engine` batches, caches and schedules.

    Every shape inside the jitted steps comes from here, so one config compiles a fixed set of
    functions: one decode step and one encode step per encoder length bucket. Every field is
    checked at construction: a value of the wrong type, 0 or a negative count raises
    ``ValueError`` naming the field; nothing is silently replaced by a default.
    """

    num_slots: int = rule(Int(1), 8)
    """Decode slots (B): sequences decoded together by every decode step."""
    page_size: int = rule(Int(1), 16)
    """Tokens per KV page (G), for both pools."""
    max_encoder_len: int = rule(Int(1), 512)
    """Longest input accepted (tokens); also the largest encoder bucket. Front ends with a fixed
    encoder length (Whisper's 1,500 positions) use their own buckets and ignore it."""
    max_new_tokens: int = rule(Int(1), 128)
    """Largest ``max_new_tokens`` a request may ask for; sizes the self page tables."""
    num_self_pages: int | None = rule(Int(2, optional=True), None)
    """Pages in the self-attention pool (sentinel included). None: from ``memory_budget_bytes``,
    else enough for every slot at ``max_new_tokens``."""
    num_cross_pages: int | None = rule(Int(2, optional=True), None)
    """Pages in the cross-attention pool (sentinel included); None as for ``num_self_pages``."""
    memory_budget_bytes: int | None = rule(Int(1, _INT64_MAX, optional=True), None)
    """KV cache budget split by ``cross_kv_fraction``, used when page counts are not given."""
    cross_kv_fraction: float = rule(Float(0.0, 1.0, open_low=True), 0.5)
    """Share of ``memory_budget_bytes`` for cross-attention pages (TensorRT-LLM's
    ``cross_kv_cache_fraction``); strictly between 0 and 1."""
    encoder_buckets: tuple[int, ...] = rule(Ints(Int(1)), (16, 32, 64, 128, 256, 512))
    """Encoder input lengths are padded up to the next bucket (one compile per bucket);
    buckets above ``max_encoder_len`` are dropped and ``max_encoder_len`` is always one."""
    max_encoder_batch: int = rule(Int(1), 8)
    """Most requests in one encoder batch."""
    max_encoder_tokens: int = rule(Int(1), 4096)
    """Most padded tokens (rows x bucket) in one encoder batch."""
    encoder_tokens_per_dispatch: int | None = rule(Int(1, optional=True), None)
    """Encoder budget: most padded encoder tokens admitted between two decode dispatches while
    slots are decoding (TensorRT-LLM's ``max_num_tokens``, vLLM's token budget), so a burst of
    long inputs does not stall every decoding slot behind serial encoder passes. At least one
    request is admitted per dispatch whatever its length, and the budget does not apply when no
    slot is decoding (nothing to stall). None: ``max_encoder_tokens`` (one full encoder batch
    per dispatch); set it very large to turn the budget off."""
    steps_per_dispatch: int = rule(Int(1), 4)
    """Most decode steps per jitted call (a device-side loop): fewer host round trips. A dispatch
    is cut short where a slot's ``max_new_tokens`` ends while requests wait, so such a slot is
    refilled at once; a slot ending at EOS idles until the next dispatch ends."""
    dispatch_overhead_steps: float | None = rule(Float(0, 1e6, optional=True), None)
    """The fixed cost of one dispatch (host work, the round's encodes, launches), in decode steps.
    While requests wait, a dispatch is as long as maximizes slot-steps of work per unit of time,
    ``sum(min(steps, remaining)) / (overhead + steps)``: 0 cuts it where the first slot's budget
    ends (best when a step is dear, as on CPU); a larger figure lets slots idle for a few steps
    rather than pay for another dispatch (as on GPU, where a step is cheap). None: 0 on CPU, 8
    elsewhere (on an H200, flan-t5-base at 64 slots: 0 gave 5.9k tokens/s over 226 dispatches,
    8 gave 11.7k over 60; docs/PERFORMANCE.md)."""
    attention_impl: Literal["auto", "pallas", "xla", "window"] = rule(
        OneOf(("auto", "pallas", "xla", "window")), "auto"
    )
    """Decode attention: ``pallas`` (the paged kernel), ``xla`` (its pure-JAX reference, pages
    gathered every step) or ``window`` (pages gathered once per dispatch into a dense copy,
    :mod:`encdec.cache.window_kv`). ``auto`` is ``pallas`` on GPU and ``window`` elsewhere."""
    mode: Literal["inflight", "static"] = rule(OneOf(("inflight", "static")), "inflight")
    """``inflight`` refills a slot as soon as its sequence ends; ``static`` starts a batch only
    when every slot is free, so the batch ends with its longest member (for comparison)."""
    max_stop_tokens: int = rule(Int(0, 4096), 4)
    """Most per-request stop token ids (besides EOS)."""
    max_decoder_prefix: int | None = rule(Int(1, optional=True), None)
    """Most forced decoder tokens a request starts with (``Request.decoder_prefix``, the start
    token included). None: the front end's default prompt length (1 for text, 4 for Whisper).
    Self page tables hold ``max_decoder_prefix - 1 + max_new_tokens`` tokens."""
    max_num_beams: int = rule(Int(1, 256), 8)
    """Most decode slots one request may hold (``num_beams``, or ``num_return_sequences`` when
    sampling); capped by ``num_slots``."""
    max_logprobs: int = rule(Int(0, 64), 5)
    """Most alternatives a request may ask for per token (``Request.logprobs``, OpenAI's limit is 5)."""
    max_suppress_tokens: int = rule(Int(0, 65536), 128)
    """Most ids in a request's ``suppress_tokens`` (and in its ``begin_suppress_tokens``)."""
    kv_allocation: Literal["reserve", "incremental"] = rule(OneOf(("reserve", "incremental")), "reserve")
    """Self pages: ``reserve`` gives a request pages for its whole ``max_new_tokens`` at admission
    (TensorRT-LLM's guaranteed-no-evict; never preempts); ``incremental`` gives pages as its
    sequence grows and preempts the latest-admitted request when the pool runs dry (it resumes
    by re-encoding and replaying its tokens, with the same output). Incremental fits more
    sequences in the same memory when requests stop early."""
    kv_reserve_pages: int | None = rule(Int(0, optional=True), None)
    """``incremental``: self pages a new request must leave free for the running ones to grow
    into (besides their next dispatch's). None: one per slot. Over data shards (``mesh_shape``),
    a total: each shard keeps its share (rounded up) in its own pool."""
    cross_kv_reuse: bool = rule(OneOf((True, False)), True)
    """Requests with the same encoder input and adapter share one copy of the cross K/V and
    skip the encoder (many prompts on one document, retries of one audio window)."""
    cross_cache_pages: int | None = rule(Int(0, optional=True), None)
    """Cross pages kept after their requests end, for later requests with the same input
    (least recently used first out; evicted whenever a fresh allocation needs room). None: no
    limit but the pool; 0: nothing kept."""
    truncate_long_inputs: bool = rule(OneOf((False, True)), False)
    """Truncate inputs longer than ``max_encoder_len`` instead of rejecting them."""
    cache_dtype: str | None = rule(OneOf((None, "float32", "bfloat16", "float16")), None)
    """KV cache dtype; None: float32 on CPU (XLA:CPU scatters into bfloat16 slowly), else the model's."""
    window_dtype: str | None = rule(OneOf((None, "float32", "bfloat16")), None)
    """dtype of the dense per-slot copy of the cache that decode attention reads where the engine
    keeps one (the window path, the CPU default: :mod:`encdec.cache.window_kv`); None: bfloat16
    for a model with int8 weights, else the cache's. ``bfloat16`` halves the bytes a decode step's
    attention reads at bfloat16's rounding of K and V; the pools keep ``cache_dtype``. With int8
    weights those bytes rival the weights' (t5-small at 8 slots of 128 + 64 tokens: as many)."""
    mesh_shape: tuple[int, int] | None = rule(Ints(Int(1), length=2, optional=True), None)
    """``(data, model)``: run over a device mesh of that shape (:mod:`encdec.sharding`): heads, MLP
    and vocabulary split over ``model`` (tensor parallel), slots, encoder rows and pages over
    ``data``; ``num_slots`` must be a multiple of ``data``, and page counts and
    ``memory_budget_bytes`` are totals over the data shards. None: one device, no sharding."""

    def __post_init__(self):
        try:
            values = check_fields(self, "EngineConfig.")
        except FieldError as e:
            raise ValueError(str(e)) from None
        for name, value in values.items():
            object.__setattr__(self, name, value)
        top = self.max_encoder_len
        buckets = sorted({b for b in self.encoder_buckets if b < top} | {top})
        object.__setattr__(self, "encoder_buckets", tuple(buckets))

    @property
    def default_max_new_tokens(self) -> int:
        """What a text request that does not say ``max_new_tokens`` gets."""
        return min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens)

    @property
    def self_reserve_pages(self) -> int:
        """Free self pages an ``incremental`` admission leaves for the running requests."""
        return self.num_slots if self.kv_reserve_pages is None else self.kv_reserve_pages

    @property
    def encoder_budget(self) -> int:
        """Padded encoder tokens admitted per decode dispatch while slots decode."""
        budget = self.encoder_tokens_per_dispatch
        return self.max_encoder_tokens if budget is None else budget

    @property
    def dispatch_overhead(self) -> float:
        """:attr:`dispatch_overhead_steps`, its default resolved for the backend."""
        if self.dispatch_overhead_steps is not None:
            return self.dispatch_overhead_steps
        import jax  # noqa: PLC0415 - config stays importable without initializing a backend

        return 0.0 if jax.default_backend() == "cpu" else 8.0

    def encoder_batch_rows(self, bucket: int) -> int:
        """Static row count of the encoder batch for ``bucket``."""
        return max(1, min(self.max_encoder_batch, self.max_encoder_tokens // bucket))
