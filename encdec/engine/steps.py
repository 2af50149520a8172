"""The engine's device side: the pure jitted steps over the typed state (:mod:`encdec.engine.slots`).

``encode_insert`` runs the front end's encoder on a bucket-shaped batch, writes every layer's
cross K/V into the requests' cross pages (once per request, however many slots it holds) and
starts their slots; ``decode_steps`` advances every slot ``n`` tokens (a device-side loop with a
traced trip count): logits, the front end's masks and hook, the request's logits processors,
then sampling, or beam selection for beam groups, and stop checks. Both take the state donated
and return it. The host reads one small :class:`StepResults` per decode dispatch.

A slot starts from its request's forced decoder prefix (the start token, or Whisper's prompt).
The encode step stores the prefix but its last token at once (:mod:`encdec.engine.prefill`);
a request that asks for prompt log-probabilities, or starts on shared cross pages, feeds it
through the decode steps instead: while the next position is inside the prefix, the step feeds
the prefix token instead of the sampled one and reports it flagged ``FORCED_BIT`` with its
log-probability, so one compiled step serves every prompt length.

Beams move by page-table permutation: a beam that continues another takes over that beam's
full self pages by reference and copies only its partially filled last page into its own
(:func:`~encdec.cache.pools.copy_layer_pages`). Every slot reserved its own pages at admission,
so no page is ever written by two slots.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from encdec.beam import BeamChoice, HypothesisRows, beam_step
from encdec.cache.allocator import SENTINEL_PAGE
from encdec.cache.paged_kv import PagedKV, write_cross
from encdec.cache.pools import copy_layer_pages
from encdec.cache.window_kv import WindowKV, cross_sources
from encdec.config import ModelConfig
from encdec.engine.prefill import prefill_prefix
from encdec.engine.slots import NO_SCORE, DecodeState, Hypotheses, SlotParams
from encdec.models import decode, project_cross_kv
from encdec.processors import DecodeContext, LogitsHook, process_scores
from encdec.sampling import TokenMasks, ban_tokens, sample, step_keys
from pallas_kernels.argmax import argmax_normalizer

# A decode result packs the token and flags; -1 = nothing to report.
FINISHED_BIT = 1 << 24
FORCED_BIT = 1 << 25

EncoderFn = Callable[..., jax.Array]
"""``(params, cfg, inputs, encoder_len_b, *, dtype, lora) -> enc_bSD``: a front end's encoder."""


@flax.struct.dataclass
class StepResults:
    """What one decode dispatch reports (``S`` = its static step count)."""

    tokens_SB: jax.Array
    """``token | FINISHED_BIT`` (last token), ``token | FORCED_BIT`` (a prefix token), or -1."""
    logprob_SB: jax.Array
    """The reported token's log-probability."""
    top_ids_SBX: jax.Array
    """The most likely tokens, where a slot asked for them (else 0)."""
    top_logprobs_SBX: jax.Array
    watched_logprob_SB: jax.Array
    """The log-probability of the slot's watched token (``SlotParams.watched_id``; 0: none)."""
    hyps: Hypotheses
    """Beam groups' hypotheses at the end of the dispatch (read when a group finishes)."""


class JittedSteps(NamedTuple):
    """Every compiled step of one engine (shared between engines of the same model and shapes)."""

    encode: Any
    insert: Any
    decode: Any
    release: Any
    grant: Any


def _lora_rows(lora_bank, lora_gather, rows):
    return None if lora_bank is None else lora_gather(lora_bank, rows)


def encode_insert(
    params,
    state: DecodeState,
    inputs: jax.Array,
    slot_bK: jax.Array,
    self_pages_bKM: jax.Array,
    rows: SlotParams,
    lora_bank=None,
    *,
    cfg: ModelConfig,
    dtype,
    encoder: EncoderFn,
    lora_gather=None,
    prefill_width: int = 0,
) -> DecodeState:
    """Encode a batch, write its cross K/V pages once per request and start its slots.

    ``inputs`` is the front end's encoder batch (right-padded token ids ``[b, S]``, or log-mel
    windows); ``slot_bK`` lists each request's slots (``num_slots``: none, dropped) and
    ``self_pages_bKM`` each slot's own self pages. ``prefill_width`` (static): the most prefix
    positions a row stores at once (:mod:`encdec.engine.prefill`); 0: none.
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
    state = start_slots(state.replace(pools=pools), slot_bK, self_pages_bKM, rows)
    if state.window is not None:  # the group's first slot holds the rows all its slots read
        state = state.replace(window=state.window.write_cross_rows(slot_bK[:, 0], k_LbSNH, v_LbSNH))
    if prefill_width > 0:  # prefixes longer than the start token
        state = prefill_prefix(
            params, state, k_LbSNH, v_LbSNH, rows, slot_bK, self_pages_bKM,
            width=prefill_width, cfg=cfg, dtype=dtype, lora=lora,
        )
    return state


def start_slots(
    state: DecodeState, slot_bK: jax.Array, self_pages_bKM: jax.Array, rows: SlotParams
) -> DecodeState:
    """Start each request's slots from its row (its cross pages already hold its encoder output:
    written by :func:`encode_insert`, or shared with an earlier request of the same input)."""
    b, K = slot_bK.shape
    B = state.active_B.shape[0]
    slot_X = slot_bK.reshape(-1)
    group_bK = jnp.where(slot_bK < B, slot_bK, -1)
    rows_X = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), rows).replace(
        self_page_table_M=self_pages_bKM.reshape(b * K, -1),
        group_X=jnp.repeat(group_bK, K, axis=0),
        beam_index=jnp.tile(jnp.arange(K, dtype=jnp.int32), b),
    )

    def put(x, new):
        return x.at[slot_X].set(jnp.broadcast_to(new, (b * K, *x.shape[1:])).astype(x.dtype), mode="drop")

    T = state.history_BT.shape[1]
    first_XT = jnp.where(jnp.arange(T)[None, :] == 0, rows_X.prefix_X[:, :1], -1)
    hyps = state.hyps
    window = None if state.window is None else state.window.start_self_rows(slot_X)
    return state.replace(
        window=window,
        slots=jax.tree.map(put, state.slots, rows_X),
        self_table_BM=put(state.self_table_BM, rows_X.self_page_table_M),
        self_lengths_B=put(state.self_lengths_B, 0),
        active_B=put(state.active_B, True),
        last_token_B=put(state.last_token_B, rows_X.prefix_X[:, 0]),
        num_generated_B=put(state.num_generated_B, 0),
        history_BT=put(state.history_BT, first_XT),
        # HF starts beam 0 at 0 and the others at -1e9, so the first step expands one beam.
        beam_score_B=put(state.beam_score_B, jnp.where(rows_X.beam_index == 0, 0.0, NO_SCORE)),
        beam_logprobs_BN=put(state.beam_logprobs_BN, 0.0),
        group_open_B=put(state.group_open_B, True),
        hyps=Hypotheses(
            tokens_BN=put(hyps.tokens_BN, 0),
            logprobs_BN=put(hyps.logprobs_BN, 0.0),
            score_B=put(hyps.score_B, NO_SCORE),
            length_B=put(hyps.length_B, 0),
            finished_B=put(hyps.finished_B, False),
        ),
    )


def insert_shared(
    state: DecodeState, slot_bK: jax.Array, self_pages_bKM: jax.Array, rows: SlotParams
) -> DecodeState:
    """:func:`start_slots` for requests that start on cross pages already written (another
    request's of the same input): with a window, their slots' cross rows are read off the pages."""
    state = start_slots(state, slot_bK, self_pages_bKM, rows)
    if state.window is None:
        return state
    pages_bM = rows.cross_page_table_M
    return state.replace(window=state.window.gather_cross_rows(state.pools, slot_bK[:, 0], pages_bM))


def prefill_widths(longest: int) -> tuple[int, ...]:
    """The prefill widths an engine whose requests prefill up to ``longest`` positions compiles:
    a narrow one for the bare prompts most requests start with (Whisper's are 3 tokens) and the
    full one (a previous-text prompt: up to 224), so a batch of bare prompts does not pay for a
    224-position decoder pass (on Whisper-base, a sixth of an encode)."""
    return tuple(sorted({min(8, longest), longest}))


def prefill_width(widths: tuple[int, ...], most: int) -> int:
    """The narrowest of ``widths`` that holds ``most`` prefilled positions."""
    return next(w for w in widths if w >= most)


def attention_path(implementation: str) -> str:
    """The decode attention ``implementation`` runs: ``auto`` is the Pallas kernel on GPU and the
    window (:mod:`encdec.cache.window_kv`) elsewhere."""
    if implementation == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "window"
    return implementation


def _no_beams(state: DecodeState) -> tuple[BeamChoice, HypothesisRows]:
    """What ``beam_step`` returns for slots that do not beam (the cond's other branch)."""
    B = state.active_B.shape[0]
    slots_B, zeros_B = jnp.arange(B, dtype=jnp.int32), jnp.zeros((B,), jnp.int32)
    choice = BeamChoice(
        slots_B, zeros_B, jnp.zeros((B,), jnp.float32), state.beam_score_B, state.group_open_B,
        jnp.zeros((B,), bool),
    )
    hyps = HypothesisRows(
        slots_B, slots_B, zeros_B, jnp.zeros((B,), jnp.float32), state.hyps.score_B, state.hyps.finished_B
    )
    return choice, hyps


def _generated(history_BT: jax.Array, prefix_len_B: jax.Array, width: int) -> jax.Array:
    """Each row's generated tokens (history past its prefix), ``[B, width]``."""
    T = history_BT.shape[1]
    cols_BN = jnp.clip(prefix_len_B[:, None] + jnp.arange(width)[None, :], 0, T - 1)
    return jnp.take_along_axis(history_BT, cols_BN, axis=1)


def _new_hypotheses(state: DecodeState, rows: HypothesisRows, n_B: jax.Array, beaming_B: jax.Array):
    """Each beam slot's entry of its group's hypotheses after this step."""
    hyps, N = state.hyps, state.hyps.tokens_BN.shape[1]
    col_BN = jnp.arange(N)[None, :]
    gen_BN = _generated(state.history_BT, state.slots.prefix_len, N)[rows.parent_B]
    tokens_BN = jnp.where(col_BN < n_B[:, None], gen_BN, 0)
    tokens_BN = jnp.where(col_BN == n_B[:, None], rows.token_B[:, None], tokens_BN)
    lp_BN = jnp.where(col_BN < n_B[:, None], state.beam_logprobs_BN[rows.parent_B], 0.0)
    lp_BN = jnp.where(col_BN == n_B[:, None], rows.token_logprob_B[:, None], lp_BN)
    old_B = rows.source_B >= 0
    src_B = jnp.clip(rows.source_B, 0)
    keep_B = ~beaming_B

    def pick(old, new):
        shape = (-1,) + (1,) * (old.ndim - 1)
        chosen = jnp.where(old_B.reshape(shape), old[src_B], new)
        return jnp.where(keep_B.reshape(shape), old, chosen)

    return Hypotheses(
        tokens_BN=pick(hyps.tokens_BN, tokens_BN),
        logprobs_BN=pick(hyps.logprobs_BN, lp_BN),
        score_B=jnp.where(keep_B, hyps.score_B, rows.score_B),
        length_B=pick(hyps.length_B, n_B + 1),
        finished_B=jnp.where(keep_B, hyps.finished_B, rows.finished_B),
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
    top_logprobs: int = 0,
    hook: LogitsHook | None = None,
    lora_gather=None,
) -> tuple[DecodeState, StepResults]:
    """Advance every active slot ``steps`` tokens (traced, at most the static ``num_steps``);
    return the state and the dispatch's results (rows from ``steps`` on report nothing).

    ``masks``: the front end's banned tokens (Whisper's ``suppress_tokens`` at every sampled
    step and ``begin_suppress_tokens`` at a slot's first), or None. ``hook``: the front end's
    logits rule (:data:`~encdec.processors.LogitsHook`), or None.

    ``implementation``: ``"window"`` attends over the state's dense copy of every slot's K/V
    (:mod:`encdec.cache.window_kv`); else paged attention with that implementation.
    ``"auto"`` is the Pallas kernel on GPU and the window elsewhere. ``top_logprobs``: how many
    alternatives the results have room for (slots that ask get them).
    """
    s = state.slots
    lora = _lora_rows(lora_bank, lora_gather, s.adapter_row)
    implementation = attention_path(implementation)
    if (implementation == "window") != (state.window is not None):
        has = "has no" if state.window is None else "has a"
        raise ValueError(f"decode attention {implementation!r} over a state that {has} window")
    B = state.active_B.shape[0]
    X = StepResults  # noqa: N806 - shorthand
    top = s.top_logprobs
    n_top = top_logprobs
    G = state.pools.page_size
    slots_B = jnp.arange(B, dtype=jnp.int32)
    beam_rows_B = s.num_beams > 1
    cross_source_B = cross_sources(s.group_X)

    def body(i, carry):
        state, out = carry
        active_B = state.active_B
        window = state.window
        common = dict(
            pools=state.pools,
            self_page_table_BM=state.self_table_BM,
            self_lengths_B=state.self_lengths_B,
            cross_lengths_B=s.cross_length,
            active_B=active_B,
        )
        if window is not None:
            kv = WindowKV(window=window, cross_source_B=cross_source_B, **common)
        else:
            kv = PagedKV(cross_page_table_BM=s.cross_page_table_M, implementation=implementation, **common)
        tokens_B1, positions_B1 = state.last_token_B[:, None], state.self_lengths_B[:, None]
        logits_B1V, kv = decode(params, cfg, tokens_B1, positions_B1, kv, dtype=dtype, lora=lora)
        n_B, L_B = state.num_generated_B, state.self_lengths_B
        ctx = DecodeContext(state.history_BT, L_B + 1, s.prefix_len, n_B)
        x_BV = logits_B1V[:, 0].astype(jnp.float32)
        # The token after position p is forced while p + 1 is inside the slot's prefix.
        forced_B = L_B + 1 < s.prefix_len
        replaying_B = forced_B & (L_B + 1 >= s.gen_start)  # a resumed request's own tokens
        leader_B = s.beam_index == 0
        prompt_B = active_B & forced_B & ~replaying_B & leader_B  # reported prompt positions
        any_beam = jnp.any(beam_rows_B & active_B)
        # Beam search processes log-probabilities, greedy and sampling logits (as HF does).
        x_BV = jax.lax.cond(
            any_beam, lambda x: jnp.where(beam_rows_B[:, None], jax.nn.log_softmax(x), x), lambda x: x, x_BV
        )
        if masks is not None:
            first_B1 = (n_B == 0)[:, None]
            x_BV = ban_tokens(x_BV, masks.every_V[None, :] | (first_B1 & masks.first_V[None, :]))
        if hook is not None:
            x_BV = hook(x_BV, ctx)
        x_BV = process_scores(x_BV, ctx, s, eos_token_id=cfg.eos_token_id)

        def lp_BV():  # [B, V] log-probabilities: built only in the branches that read them
            return jnp.where(beam_rows_B[:, None], x_BV, jax.nn.log_softmax(x_BV))

        keys = lambda: step_keys(s.seed, n_B, s.beam_index)  # noqa: E731 - only where a row samples
        # One read of the scores for the greedy pick and the log-softmax normalizer.
        greedy_B, max_B, sum_exp_B = argmax_normalizer(x_BV)
        token_B = sample(x_BV, keys, s.temperature, s.top_k, s.top_p, greedy_B)
        forced_token_B = jnp.take_along_axis(
            s.prefix_X, jnp.minimum(L_B + 1, s.prefix_X.shape[1] - 1)[:, None], axis=1
        )[:, 0]
        token_B = jnp.where(forced_B, forced_token_B, token_B)
        beaming_B = beam_rows_B & active_B & ~forced_B
        choice, hyp_rows = jax.lax.cond(
            jnp.any(beaming_B),
            lambda: beam_step(
                lp_BV(), state.beam_score_B, n_B, state.group_open_B, state.hyps.score_B,
                state.hyps.finished_B, s, eos_token_id=cfg.eos_token_id,
            ),
            lambda: _no_beams(state),
        )
        token_B = jnp.where(beaming_B, choice.token_B, token_B)
        parent_B = jnp.where(beaming_B, choice.parent_B, slots_B)
        # The chosen and the watched token in one gather (no pass over the scores of its own).
        ids_B2 = jnp.stack([token_B, jnp.maximum(s.watched_id, 0)], axis=1)
        lp_B2 = chosen_logprob(x_BV, ids_B2, beam_rows_B, max_B, sum_exp_B)
        chosen_lp_B, watched_lp_B = lp_B2[:, 0], jnp.where(s.watched_id >= 0, lp_B2[:, 1], 0.0)
        token_lp_B = jnp.where(beaming_B, choice.token_logprob_B, chosen_lp_B)

        # Beams follow their parents: full pages by reference, the partial last page by copy.
        stored_B = kv.self_lengths_B
        pools, table_BM = kv.pools, state.self_table_BM
        history_BT, beam_lp_BN = state.history_BT, state.beam_logprobs_BN
        if window is not None:
            window = kv.window

        def follow(args):
            pools, table_BM, history_BT, beam_lp_BN, window = args
            full_B = stored_B // G
            parent_table_BM = table_BM[parent_B]
            M = table_BM.shape[1]
            borrowed_BM = jnp.arange(M)[None, :] < full_B[:, None]
            new_table_BM = jnp.where(borrowed_BM, parent_table_BM, s.self_page_table_M)
            partial_B = beaming_B & (stored_B % G != 0) & (parent_B != slots_B)
            col_B1 = jnp.clip(full_B, 0, M - 1)[:, None]
            src_B = jnp.take_along_axis(parent_table_BM, col_B1, axis=1)[:, 0]
            own_B = jnp.take_along_axis(s.self_page_table_M, col_B1, axis=1)[:, 0]
            dst_B = jnp.where(partial_B, own_B, SENTINEL_PAGE)
            pools = pools.replace(
                self_k_LNPGH=copy_layer_pages(pools.self_k_LNPGH, src_B, dst_B),
                self_v_LNPGH=copy_layer_pages(pools.self_v_LNPGH, src_B, dst_B),
            )
            if window is not None:
                window = window.take_self_rows(parent_B)
            return pools, new_table_BM, history_BT[parent_B], beam_lp_BN[parent_B], window

        pools, table_BM, history_BT, beam_lp_BN, window = jax.lax.cond(
            jnp.any(beaming_B), follow, lambda a: a, (pools, table_BM, history_BT, beam_lp_BN, window)
        )
        T, N = history_BT.shape[1], beam_lp_BN.shape[1]
        history_BT = history_BT.at[slots_B, jnp.where(active_B, stored_B, T)].set(token_B, mode="drop")
        beam_lp_BN = beam_lp_BN.at[slots_B, jnp.where(beaming_B, n_B, N)].set(token_lp_B, mode="drop")
        hyps = jax.lax.cond(
            jnp.any(beaming_B), lambda: _new_hypotheses(state, hyp_rows, n_B, beaming_B), lambda: state.hyps
        )

        emits_B = active_B & ~forced_B
        stop_B = (token_B == cfg.eos_token_id) | jnp.any(token_B[:, None] == s.stop_ids_X, axis=-1)
        ended_B = emits_B & (stop_B | (n_B + 1 >= s.max_new))
        finished_B = jnp.where(beam_rows_B, choice.done_B & beaming_B, ended_B)
        reported_B = jnp.where(
            beam_rows_B,
            jnp.where(finished_B & leader_B, FINISHED_BIT, -1),
            jnp.where(emits_B, token_B | jnp.where(finished_B, FINISHED_BIT, 0), -1),
        )
        reported_B = jnp.where(prompt_B, forced_token_B | FORCED_BIT, reported_B)
        none = (jnp.zeros((B, n_top), jnp.int32), jnp.zeros((B, n_top), jnp.float32))
        top_ids_BX, top_lp_BX = none if not n_top else jax.lax.cond(
            jnp.any(active_B & (top > 0)), lambda: _top(lp_BV(), n_top), lambda: none
        )
        state = state.replace(
            pools=pools,
            self_table_BM=table_BM,
            self_lengths_B=stored_B,
            last_token_B=jnp.where(active_B, token_B, state.last_token_B),
            num_generated_B=n_B + (emits_B | (active_B & replaying_B)).astype(jnp.int32),
            active_B=active_B & ~finished_B,
            history_BT=history_BT,
            beam_score_B=jnp.where(beaming_B, choice.score_B, state.beam_score_B),
            beam_logprobs_BN=beam_lp_BN,
            group_open_B=jnp.where(beaming_B, choice.open_B, state.group_open_B),
            hyps=hyps,
        )
        row = (i, 0)
        out = X(
            tokens_SB=jax.lax.dynamic_update_slice(out.tokens_SB, reported_B[None].astype(jnp.int32), row),
            logprob_SB=jax.lax.dynamic_update_slice(out.logprob_SB, token_lp_B[None], row),
            top_ids_SBX=jax.lax.dynamic_update_slice(out.top_ids_SBX, top_ids_BX[None], (i, 0, 0)),
            top_logprobs_SBX=jax.lax.dynamic_update_slice(out.top_logprobs_SBX, top_lp_BX[None], (i, 0, 0)),
            watched_logprob_SB=jax.lax.dynamic_update_slice(out.watched_logprob_SB, watched_lp_B[None], row),
            hyps=out.hyps,
        )
        return state.replace(window=window), out

    S = num_steps
    steps = jnp.clip(jnp.asarray(steps, jnp.int32), 0, S)
    out = X(
        tokens_SB=jnp.full((S, B), -1, jnp.int32),
        logprob_SB=jnp.zeros((S, B), jnp.float32),
        top_ids_SBX=jnp.zeros((S, B, n_top), jnp.int32),
        top_logprobs_SBX=jnp.zeros((S, B, n_top), jnp.float32),
        watched_logprob_SB=jnp.zeros((S, B), jnp.float32),
        hyps=state.hyps,
    )
    state, out = jax.lax.fori_loop(0, steps, body, (state, out))
    return state, out.replace(hyps=state.hyps)


def chosen_logprob(
    x_BV: jax.Array, ids_BN: jax.Array, is_logprob_B: jax.Array, max_B: jax.Array, sum_exp_B: jax.Array
) -> jax.Array:
    """``log_softmax(x_BV)[ids_BN]`` per row (``x_BV[ids_BN]`` where ``is_logprob_B``) from the
    rows' normalizer (:func:`argmax_normalizer`), as ``jax.nn.log_softmax`` computes it, without
    its ``[B, V]`` result (~0.3 ms of an 8-row CPU step to write and read again)."""
    x_BN = take_per_row(x_BV, ids_BN)
    return jnp.where(is_logprob_B[:, None], x_BN, (x_BN - max_B[:, None]) - jnp.log(sum_exp_B)[:, None])


SLICED_TAKE_MAX = 64
"""The most values :func:`take_per_row` reads as one-element slices on CPU (a gather beyond)."""


def take_per_row(x_BV: jax.Array, ids_BN: jax.Array) -> jax.Array:
    """``x_BV[b, ids_BN[b, n]]`` (``jnp.take_along_axis`` on axis 1; ids in ``[-V, V)``).

    On CPU, up to :data:`SLICED_TAKE_MAX` values, as one-element slices: XLA:CPU splits a gather
    over its thread pool by the size of what it gathers from, and for the 16 logits of an 8-slot
    step, waking a pool thread took 40-75 us of a ~2.3 ms t5-small int8 step (the same gather
    alone: 2-3 us). The slices are not split."""
    B, N = ids_BN.shape
    if jax.default_backend() != "cpu" or B * N > SLICED_TAKE_MAX:
        return jnp.take_along_axis(x_BV, ids_BN, axis=1)
    ids_BN = jnp.where(ids_BN < 0, ids_BN + x_BV.shape[1], ids_BN).astype(jnp.int32)
    values = [jax.lax.dynamic_slice(x_BV, (b, ids_BN[b, n]), (1, 1)) for b in range(B) for n in range(N)]
    return jnp.concatenate(values).reshape(B, N)


def _top(lp_BV: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    values_BX, ids_BX = jax.lax.top_k(lp_BV, n)
    return ids_BX.astype(jnp.int32), values_BX


def release_slots(state: DecodeState, release_B: jax.Array) -> DecodeState:
    """Stop the given slots (cancellation, preemption); their pages are freed by the host."""
    return state.replace(active_B=state.active_B & ~release_B)


def grant_pages(state: DecodeState, slot_X: jax.Array, index_X: jax.Array, page_X: jax.Array) -> DecodeState:
    """Add self pages to running slots' tables (entry ``index_X`` of slot ``slot_X``; a slot
    of ``num_slots`` is padding, dropped). A new page is past every borrowed one, so a beam's
    current table gets it as its own table does."""
    s = state.slots

    def put(table_BM):
        return table_BM.at[slot_X, index_X].set(page_X, mode="drop")

    return state.replace(
        slots=s.replace(self_page_table_M=put(s.self_page_table_M)), self_table_BM=put(state.self_table_BM)
    )


@functools.lru_cache(maxsize=32)
def jitted_steps(
    cfg,
    dtype: str,
    num_steps: int,
    top_logprobs: int,
    implementation: str,
    encoder,
    hook,
    lora_gather,
) -> JittedSteps:
    """The jitted steps, shared by engines of the same model config and front end: a new engine
    (another mode, another slot count) reuses compiled variants instead of compiling them again.
    ``encode`` takes the batch's ``prefill_width`` (static, :func:`prefill_widths`)."""
    lora_kw = {} if lora_gather is None else {"lora_gather": lora_gather}
    encode = jax.jit(
        functools.partial(encode_insert, cfg=cfg, dtype=jnp.dtype(dtype), encoder=encoder, **lora_kw),
        donate_argnames=("state",),
        static_argnames=("prefill_width",),
    )
    decode = jax.jit(
        functools.partial(
            decode_steps,
            cfg=cfg,
            dtype=jnp.dtype(dtype),
            num_steps=num_steps,
            implementation=implementation,
            top_logprobs=top_logprobs,
            hook=hook,
            **lora_kw,
        ),
        donate_argnames=("state",),
    )
    donated = functools.partial(jax.jit, donate_argnames=("state",))
    return JittedSteps(encode, donated(insert_shared), decode, donated(release_slots), donated(grant_pages))


def clear_compiled() -> None:
    """Forget every engine step compiled so far in this process (the step functions cached per
    configuration, and JAX's caches). Engines already built keep working and compile again on
    use. For a process that builds many configurations one after another (a bench): XLA:CPU maps
    each executable's code separately, and a 20-run bench kept enough of them to exhaust
    ``vm.max_map_count`` (65,530), which crashed the compiler with "Cannot allocate memory"."""
    from encdec.engine.sharded import sharded_steps  # sharded imports this module

    jitted_steps.cache_clear()
    sharded_steps.cache_clear()
    jax.clear_caches()
