"""The engine's device side: a typed state and the pure jitted steps over it.

``encode_insert`` runs the front end's encoder on a bucket-shaped batch, writes every layer's
cross K/V into the requests' cross pages and starts their slots with their :class:`SlotParams`
rows; ``decode_steps`` advances every slot ``n`` tokens (a device-side loop with a traced trip
count), samples on device and retires finished slots. Both take the state donated and return
it. The host reads one small int32 array per decode dispatch.

A slot starts from its request's forced decoder prefix (the start token, or Whisper's 4-token
prompt): while the next position is inside the prefix, the step feeds the prefix token instead
of the sampled one and reports nothing (-1), so one compiled step serves every prompt length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from encdec.cache.paged_kv import PagedKV, write_cross
from encdec.cache.pools import PagePools
from encdec.cache.window_kv import WindowKV, open_window
from encdec.config import ModelConfig
from encdec.engine.request import Request
from encdec.models import decode, project_cross_kv
from encdec.sampling import TokenMasks, ban_token, ban_tokens, sample, step_keys

# A decode result packs the token and a finished flag: token | FINISHED_BIT; -1 = slot idle.
FINISHED_BIT = 1 << 24

EncoderFn = Callable[..., jax.Array]
"""``(params, cfg, inputs, encoder_len_b, *, dtype, lora) -> enc_bSD``: a front end's encoder."""


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
    """Forced decoder tokens per slot."""


def _slot_field(dtype: Any, width: str | None = None, fill: Any = 0) -> Any:
    return flax.struct.field(metadata={"dtype": dtype, "width": width, "fill": fill})


@flax.struct.dataclass
class SlotParams:
    """A request's fixed fields in its slot: written by the encode step, read by every decode step.

    Every array has a leading row axis, ``B`` (slots) in :class:`DecodeState` and ``b``
    (requests) in an encoder batch; fields with a width have it as their second axis. Each
    field declares its dtype, width and fill (the value of an unused row); :func:`slot_row`
    is the one host function that fills a request's row.
    """

    self_page_table_M: jax.Array = _slot_field(np.int32, "self_pages")
    """Self pages in token order; unused entries are the sentinel page (0)."""
    cross_page_table_M: jax.Array = _slot_field(np.int32, "cross_pages")
    """Cross pages holding encoder positions ``0 .. cross_length - 1``."""
    cross_length: jax.Array = _slot_field(np.int32)
    """Encoder positions (0 in a padding row of an encoder batch: it writes nothing)."""
    max_new: jax.Array = _slot_field(np.int32)
    min_new: jax.Array = _slot_field(np.int32)
    stop_ids_X: jax.Array = _slot_field(np.int32, "stop_tokens", fill=-1)
    """Stop tokens besides EOS, padded with -1."""
    temperature: jax.Array = _slot_field(np.float32)
    top_k: jax.Array = _slot_field(np.int32)
    top_p: jax.Array = _slot_field(np.float32, fill=1.0)
    seed: jax.Array = _slot_field(np.int32)
    adapter_row: jax.Array = _slot_field(np.int32)
    """Row of the LoRA adapter bank (0 = none)."""
    prefix_X: jax.Array = _slot_field(np.int32, "prefix")
    """Forced decoder tokens (start token first), padded with 0."""
    prefix_len: jax.Array = _slot_field(np.int32, fill=1)

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
    self_pages: Sequence[int],
    cross_pages: Sequence[int],
    encoder_len: int,
    prefix: Sequence[int],
    max_new_tokens: int,
    adapter_row: int,
) -> SlotParams:
    """One request's row (numpy, leading axis 1) from its checked request and admission."""
    p = SlotParams.empty(1, shape)
    p.self_page_table_M[0, : len(self_pages)] = self_pages
    p.cross_page_table_M[0, : len(cross_pages)] = cross_pages
    p.cross_length[0] = encoder_len
    p.max_new[0] = max_new_tokens
    p.min_new[0] = request.min_new_tokens
    p.stop_ids_X[0, : len(request.stop_token_ids)] = request.stop_token_ids
    p.temperature[0] = request.temperature
    p.top_k[0] = request.top_k
    p.top_p[0] = request.top_p
    p.seed[0] = request.seed
    p.adapter_row[0] = adapter_row
    p.prefix_X[0, : len(prefix)] = prefix
    p.prefix_len[0] = len(prefix)
    return p


def stack_rows(rows: Sequence[SlotParams], total: int, shape: SlotShape) -> SlotParams:
    """Rows one after another, padded with unused rows up to ``total``."""
    padding = [SlotParams.empty(total - len(rows), shape)] if total > len(rows) else []
    return jax.tree.map(lambda *xs: np.concatenate(xs), *rows, *padding)


@flax.struct.dataclass
class DecodeState:
    """Everything the decode step reads: the page pools, each slot's request fields and where
    each slot is in its sequence."""

    pools: PagePools
    slots: SlotParams
    self_lengths_B: jax.Array
    """Tokens stored in the self pages: the position of ``last_token_B``."""
    active_B: jax.Array
    last_token_B: jax.Array
    num_generated_B: jax.Array
    """Sampled tokens so far (forced prefix tokens not counted)."""


def init_state(pools: PagePools, num_slots: int, shape: SlotShape) -> DecodeState:
    B = num_slots

    def zeros():  # a fresh buffer per field: donated fields must not alias
        return jnp.zeros((B,), jnp.int32)

    return DecodeState(
        pools=pools,
        slots=jax.tree.map(jnp.asarray, SlotParams.empty(B, shape)),
        self_lengths_B=zeros(),
        active_B=jnp.zeros((B,), bool),
        last_token_B=zeros(),
        num_generated_B=zeros(),
    )


def _lora_rows(lora_bank, lora_gather, rows):
    return None if lora_bank is None else lora_gather(lora_bank, rows)


def encode_insert(
    params,
    state: DecodeState,
    inputs: jax.Array,
    slot_b: jax.Array,
    rows: SlotParams,
    lora_bank=None,
    *,
    cfg: ModelConfig,
    dtype,
    encoder: EncoderFn,
    lora_gather=None,
) -> DecodeState:
    """Encode a batch, write its cross K/V pages and start its slots.

    ``inputs`` is the front end's encoder batch (right-padded token ids ``[b, S]``, or log-mel
    windows); ``slot_b`` says which slot each row starts (``num_slots``: a padding row, dropped).
    """
    lora = _lora_rows(lora_bank, lora_gather, rows.adapter_row)
    enc_bSD = encoder(params, cfg, inputs, rows.cross_length, dtype=dtype, lora=lora)
    k_LbSNH, v_LbSNH = project_cross_kv(params, cfg, enc_bSD, lora=lora)
    pool_dtype = state.pools.cross_k_LNPGH.dtype
    pools = write_cross(
        state.pools,
        k_LbSNH.astype(pool_dtype),
        v_LbSNH.astype(pool_dtype),
        rows.cross_page_table_M,
        rows.cross_length,
    )

    def put(x, new):
        return x.at[slot_b].set(new.astype(x.dtype), mode="drop")

    b = slot_b.shape[0]
    return state.replace(
        pools=pools,
        slots=jax.tree.map(put, state.slots, rows),
        self_lengths_B=put(state.self_lengths_B, jnp.zeros((b,), jnp.int32)),
        active_B=put(state.active_B, jnp.ones((b,), bool)),
        last_token_B=put(state.last_token_B, rows.prefix_X[:, 0]),
        num_generated_B=put(state.num_generated_B, jnp.zeros((b,), jnp.int32)),
    )


def decode_steps(
    params,
    state: DecodeState,
    steps: jax.Array | int,
    lora_bank=None,
    masks: TokenMasks | None = None,
    *,
    cfg: ModelConfig,
    dtype,
    num_steps: int,
    implementation: str,
    lora_gather=None,
) -> tuple[DecodeState, jax.Array]:
    """Advance every active slot ``steps`` tokens (traced, at most the static ``num_steps``);
    return the state and ``[num_steps, B]`` results, rows from ``steps`` on -1.

    One compiled step serves every dispatch length, so the host can end a dispatch exactly
    where a slot's token budget ends.

    ``masks``: the front end's banned tokens (Whisper's ``suppress_tokens`` at every sampled
    step and ``begin_suppress_tokens`` at a slot's first), or None.

    ``implementation``: ``"window"`` attends over a dense copy of the pages made once per
    dispatch (:mod:`encdec.cache.window_kv`); else paged attention with that implementation.
    ``"auto"`` is the Pallas kernel on GPU and the window elsewhere.
    """
    s = state.slots
    lora = _lora_rows(lora_bank, lora_gather, s.adapter_row)
    if implementation == "auto" and jax.default_backend() != "gpu":
        implementation = "window"
    window = None
    if implementation == "window":
        window = open_window(
            state.pools, s.self_page_table_M, state.self_lengths_B, s.cross_page_table_M, s.cross_length
        )

    def body(i, carry):
        state, window, results_SB = carry
        active_B = state.active_B
        if window is not None:
            kv = WindowKV(
                pools=state.pools,
                window=window,
                self_page_table_BM=s.self_page_table_M,
                self_lengths_B=state.self_lengths_B,
                cross_lengths_B=s.cross_length,
                active_B=active_B,
            )
        else:
            kv = PagedKV(
                pools=state.pools,
                self_page_table_BM=s.self_page_table_M,
                self_lengths_B=state.self_lengths_B,
                cross_page_table_BM=s.cross_page_table_M,
                cross_lengths_B=s.cross_length,
                active_B=active_B,
                implementation=implementation,
            )
        logits_B1V, kv = decode(
            params,
            cfg,
            state.last_token_B[:, None],
            state.self_lengths_B[:, None],
            kv,
            dtype=dtype,
            lora=lora,
        )
        n_B = state.num_generated_B
        logits_BV = ban_token(logits_B1V[:, 0], jnp.where(n_B < s.min_new, cfg.eos_token_id, -1))
        if masks is not None:
            first_B1 = (n_B == 0)[:, None]
            logits_BV = ban_tokens(logits_BV, masks.every_V[None, :] | (first_B1 & masks.first_V[None, :]))
        keys = step_keys(s.seed, n_B)
        token_B = sample(logits_BV, keys, s.temperature, s.top_k, s.top_p)
        # The token after position p is forced while p + 1 is inside the slot's prefix.
        next_B1 = state.self_lengths_B[:, None] + 1
        forced_B = next_B1[:, 0] < s.prefix_len
        forced_token_B = jnp.take_along_axis(
            s.prefix_X, jnp.minimum(next_B1, s.prefix_X.shape[1] - 1), axis=1
        )[:, 0]
        token_B = jnp.where(forced_B, forced_token_B, token_B)
        emits_B = active_B & ~forced_B
        stop_B = (token_B == cfg.eos_token_id) | jnp.any(token_B[:, None] == s.stop_ids_X, axis=-1)
        finished_B = emits_B & (stop_B | (n_B + 1 >= s.max_new))
        result_B = jnp.where(emits_B, token_B | jnp.where(finished_B, FINISHED_BIT, 0), -1)
        state = state.replace(
            pools=kv.pools,
            self_lengths_B=kv.self_lengths_B,
            last_token_B=jnp.where(active_B, token_B, state.last_token_B),
            num_generated_B=n_B + emits_B.astype(jnp.int32),
            active_B=active_B & ~finished_B,
        )
        results_SB = jax.lax.dynamic_update_slice(results_SB, result_B.astype(jnp.int32)[None], (i, 0))
        return state, None if window is None else kv.window, results_SB

    B = state.active_B.shape[0]
    steps = jnp.clip(jnp.asarray(steps, jnp.int32), 0, num_steps)
    results_SB = jnp.full((num_steps, B), -1, jnp.int32)
    state, _, results_SB = jax.lax.fori_loop(0, steps, body, (state, window, results_SB))
    return state, results_SB


def release_slots(state: DecodeState, release_B: jax.Array) -> DecodeState:
    """Stop the given slots (cancellation); their pages are freed by the host."""
    return state.replace(active_B=state.active_B & ~release_B)


@functools.lru_cache(maxsize=32)
def jitted_steps(cfg, dtype: str, num_steps: int, implementation: str, encoder, lora_gather):
    """The jitted steps, shared by engines of the same model config and front end: a new engine
    (another mode, another slot count) reuses compiled variants instead of compiling them again."""
    lora_kw = {} if lora_gather is None else {"lora_gather": lora_gather}
    encode = jax.jit(
        functools.partial(encode_insert, cfg=cfg, dtype=jnp.dtype(dtype), encoder=encoder, **lora_kw),
        donate_argnames=("state",),
    )
    decode = jax.jit(
        functools.partial(
            decode_steps,
            cfg=cfg,
            dtype=jnp.dtype(dtype),
            num_steps=num_steps,
            implementation=implementation,
            **lora_kw,
        ),
        donate_argnames=("state",),
    )
    return encode, decode, jax.jit(release_slots, donate_argnames=("state",))
