"""The engine's typed device state: one :class:`SlotParams` record per slot, and :class:`DecodeState`.

Every per-request option lives in one place: a :class:`SlotParams` field, which declares its
dtype, width, fill and (``request=``) the :class:`~encdec.engine.Request` field it is copied
from, so :func:`slot_row` fills it without a line of its own.

A request may hold several slots (a *group*): ``num_beams`` beams, or ``num_return_sequences``
independent samples. The encode step starts every slot of a group from the request's one row
and its one set of cross pages; each slot's :attr:`SlotParams.group_X` lists the group's slots
in beam order and :attr:`SlotParams.beam_index` is its own place there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from encdec.cache.pools import PagePools
from encdec.cache.window_kv import SlotWindow, init_window
from encdec.engine.request import Request

NO_SCORE = -1.0e9
"""HF's score of an unused beam or hypothesis (added, not assigned, as HF does)."""

EARLY_STOPPING = {False: 0, True: 1, "never": 2}
"""``Request.early_stopping`` as the int the device reads."""


@dataclasses.dataclass(frozen=True)
class SlotShape:
    """Widths of the per-slot arrays; static, so part of every compiled step's shapes."""

    self_pages: int
    """Self page-table width (pages for the longest prefix plus ``max_new_tokens``)."""
    cross_pages: int
    """Cross page-table width (pages for the longest encoder input)."""
    stop_tokens: int
    """Stop ids per slot besides EOS."""
    prefix: int
    """Forced decoder tokens per slot (a resumed request's replayed tokens included)."""
    suppress: int
    """Suppressed token ids per slot (each list)."""
    group: int
    """Most slots one request holds (beams or samples)."""
    max_new: int
    """Most tokens a slot generates (``EngineConfig.max_new_tokens``)."""
    top_logprobs: int
    """Alternatives reported per token (``EngineConfig.max_logprobs``)."""

    @property
    def history(self) -> int:
        """Decoder positions a slot can hold: the longest prefix plus ``max_new_tokens``."""
        return self.prefix + self.max_new


def _slot_field(dtype: Any, width: str | None = None, fill: Any = 0, request: str | None = None) -> Any:
    return flax.struct.field(metadata={"dtype": dtype, "width": width, "fill": fill, "request": request})


@flax.struct.dataclass
class SlotParams:
    """A request's fixed fields in its slots: written by the encode step, read by every decode step.

    Every array has a leading row axis, ``B`` (slots) in :class:`DecodeState` and ``b``
    (requests) in an encoder batch; fields with a width have it as their second axis.
    """

    self_page_table_M: jax.Array = _slot_field(np.int32, "self_pages")
    """The slot's own self pages in token order (beams borrow full pages from each other through
    :attr:`DecodeState.self_table_BM`); unused entries are the sentinel page (0)."""
    cross_page_table_M: jax.Array = _slot_field(np.int32, "cross_pages")
    """Cross pages holding encoder positions ``0 .. cross_length - 1`` (shared by a group)."""
    cross_length: jax.Array = _slot_field(np.int32)
    """Encoder positions (0 in a padding row of an encoder batch: it writes nothing)."""
    max_new: jax.Array = _slot_field(np.int32)
    min_new: jax.Array = _slot_field(np.int32, request="min_new_tokens")
    stop_ids_X: jax.Array = _slot_field(np.int32, "stop_tokens", fill=-1, request="stop_token_ids")
    """Stop tokens besides EOS, padded with -1."""
    temperature: jax.Array = _slot_field(np.float32, request="temperature")
    top_k: jax.Array = _slot_field(np.int32, request="top_k")
    top_p: jax.Array = _slot_field(np.float32, fill=1.0, request="top_p")
    seed: jax.Array = _slot_field(np.int32, request="seed")
    adapter_row: jax.Array = _slot_field(np.int32)
    """Row of the LoRA adapter bank (0 = none)."""
    prefix_X: jax.Array = _slot_field(np.int32, "prefix")
    """Forced decoder tokens (start token first), padded with 0."""
    prefix_len: jax.Array = _slot_field(np.int32, fill=1)
    gen_start: jax.Array = _slot_field(np.int32, fill=1)
    """Position of the first generated token: the request's own prefix length. A resumed
    (preempted) request's prefix runs further, replaying its tokens: counted, not reported."""
    prefilled: jax.Array = _slot_field(np.int32)
    """Prefix positions the encode step stores at once (the decoder over the prefix in one
    pass); the decode steps start from there. 0: every prefix token takes a decode step."""
    repetition_penalty: jax.Array = _slot_field(np.float32, fill=1.0, request="repetition_penalty")
    no_repeat_ngram: jax.Array = _slot_field(np.int32, request="no_repeat_ngram_size")
    forced_bos: jax.Array = _slot_field(np.int32, fill=-1, request="forced_bos_token_id")
    forced_eos: jax.Array = _slot_field(np.int32, fill=-1, request="forced_eos_token_id")
    suppress_X: jax.Array = _slot_field(np.int32, "suppress", fill=-1, request="suppress_tokens")
    begin_suppress_X: jax.Array = _slot_field(np.int32, "suppress", fill=-1, request="begin_suppress_tokens")
    top_logprobs: jax.Array = _slot_field(np.int32)
    """Alternatives to report per token (0: none)."""
    watched_id: jax.Array = _slot_field(np.int32, fill=-1, request="prompt_logprob_token_id")
    """A token whose log-probability each reported prompt position gives (-1: none)."""
    num_beams: jax.Array = _slot_field(np.int32, fill=1, request="num_beams")
    """Beam search over the group's slots when above 1; 1: each slot samples on its own."""
    length_penalty: jax.Array = _slot_field(np.float32, fill=1.0, request="length_penalty")
    early_stopping: jax.Array = _slot_field(np.int32)
    """:data:`EARLY_STOPPING` code."""
    group_X: jax.Array = _slot_field(np.int32, "group", fill=-1)
    """The group's slots in beam order, padded with -1 (set by the encode step)."""
    beam_index: jax.Array = _slot_field(np.int32)
    """This slot's place in its group (set by the encode step)."""

    @classmethod
    def empty(cls, rows: int, shape: SlotShape) -> SlotParams:
        """``rows`` unused rows (numpy), every field at its fill value."""
        arrays = {}
        for f in dataclasses.fields(cls):
            width = f.metadata["width"]
            dims = (rows,) if width is None else (rows, getattr(shape, width))
            arrays[f.name] = np.full(dims, f.metadata["fill"], f.metadata["dtype"])
        return cls(**arrays)


def slot_row(
    shape: SlotShape,
    request: Request,
    *,
    cross_pages: Sequence[int],
    encoder_len: int,
    prefix: Sequence[int],
    max_new_tokens: int,
    adapter_row: int,
    gen_start: int | None = None,
    prefilled: int = 0,
) -> SlotParams:
    """One request's row (numpy, leading axis 1) from its checked request and admission.

    Fields that name a request field are copied from it (None: the fill); the encode step sets
    each slot's own pages, group and beam index.
    """
    p = SlotParams.empty(1, shape)
    for f in dataclasses.fields(SlotParams):
        name = f.metadata["request"]
        value = None if name is None else getattr(request, name)
        if value is None:
            continue
        if f.metadata["width"] is None:
            getattr(p, f.name)[0] = value
        else:
            getattr(p, f.name)[0, : len(value)] = value
    p.cross_page_table_M[0, : len(cross_pages)] = cross_pages
    p.cross_length[0] = encoder_len
    p.max_new[0] = max_new_tokens
    p.adapter_row[0] = adapter_row
    p.prefix_X[0, : len(prefix)] = prefix
    p.prefix_len[0] = len(prefix)
    p.gen_start[0] = len(prefix) if gen_start is None else gen_start
    p.prefilled[0] = prefilled
    p.top_logprobs[0] = max(request.logprobs or 0, request.prompt_logprobs or 0)
    p.early_stopping[0] = EARLY_STOPPING[request.early_stopping]
    return p


def stack_rows(rows: Sequence[SlotParams], total: int, shape: SlotShape) -> SlotParams:
    """Rows one after another, padded with unused rows up to ``total``."""
    padding = [SlotParams.empty(total - len(rows), shape)] if total > len(rows) else []
    return jax.tree.map(lambda *xs: np.concatenate(xs), *rows, *padding)


@flax.struct.dataclass
class Hypotheses:
    """A beam group's finished hypotheses, one per slot of the group (best first once sorted);
    for a slot outside beam search, unused."""

    tokens_BN: jax.Array
    """Generated tokens (the prefix excluded)."""
    logprobs_BN: jax.Array
    """Each token's processed log-probability."""
    score_B: jax.Array
    """Length-penalized sum of log-probabilities (HF's ``sequences_scores``)."""
    length_B: jax.Array
    finished_B: jax.Array


@flax.struct.dataclass
class DecodeState:
    """Everything the decode step reads: the page pools, each slot's request fields and where
    each slot is in its sequence."""

    pools: PagePools
    slots: SlotParams
    self_table_BM: jax.Array
    """Self pages each slot reads now: its own, except the full pages a beam took over from the
    beam it continues (page-table permutation; only a partial last page is ever copied)."""
    self_lengths_B: jax.Array
    """Tokens stored in the self pages: the position of ``last_token_B``."""
    active_B: jax.Array
    last_token_B: jax.Array
    num_generated_B: jax.Array
    """Sampled tokens so far (forced prefix tokens not counted)."""
    history_BT: jax.Array
    """Decoder tokens at positions ``0 .. self_lengths`` (-1 after), for logits processors."""
    beam_score_B: jax.Array
    """A beam's running sum of log-probabilities."""
    beam_logprobs_BN: jax.Array
    """A beam's per-token log-probabilities so far (they move with the beam, like its pages)."""
    group_open_B: jax.Array
    """A beam group can still improve its finished hypotheses (HF's early-stop heuristic)."""
    hyps: Hypotheses
    window: SlotWindow | None = None
    """Every slot's K/V, dense, for attention on XLA backends (:mod:`encdec.cache.window_kv`);
    None where attention reads the pages (the Pallas kernel)."""


def init_state(
    pools: PagePools,
    num_slots: int,
    shape: SlotShape,
    *,
    window: bool = False,
    window_dtype: str | None = None,
) -> DecodeState:
    """A state with every slot free; ``window``: with a :class:`SlotWindow` (XLA attention), in
    ``window_dtype`` (default the pools')."""
    B, N = num_slots, shape.max_new

    def full(dims, value, dtype):  # a fresh buffer per field: donated fields must not alias
        return jnp.full(dims, value, dtype)

    slots = jax.tree.map(jnp.asarray, SlotParams.empty(B, shape))
    return DecodeState(
        pools=pools,
        slots=slots,
        self_table_BM=full((B, shape.self_pages), 0, jnp.int32),
        self_lengths_B=full((B,), 0, jnp.int32),
        active_B=full((B,), False, bool),
        last_token_B=full((B,), 0, jnp.int32),
        num_generated_B=full((B,), 0, jnp.int32),
        history_BT=full((B, shape.history), -1, jnp.int32),
        beam_score_B=full((B,), 0.0, jnp.float32),
        beam_logprobs_BN=full((B, N), 0.0, jnp.float32),
        group_open_B=full((B,), True, bool),
        hyps=Hypotheses(
            tokens_BN=full((B, N), 0, jnp.int32),
            logprobs_BN=full((B, N), 0.0, jnp.float32),
            score_B=full((B,), NO_SCORE, jnp.float32),
            length_B=full((B,), 0, jnp.int32),
            finished_B=full((B,), False, bool),
        ),
        window=init_window(pools, B, shape.self_pages, shape.cross_pages, window_dtype) if window else None,
    )
