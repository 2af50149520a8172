"""Logits processors on device, one set of parameters per row, with HF ``generate``'s semantics.

A decode step sees every slot's scores ``[B, V]`` and its decoder history; each row carries its
own parameters (:class:`ProcessorParams`, fields of the engine's ``SlotParams``), so one
compiled step serves any mix of requests. :func:`process_scores` applies them in HF's order
(``GenerationMixin._get_logits_processor``): repetition penalty, no-repeat n-grams, minimum new
tokens, forced BOS, forced EOS, suppressed tokens, suppressed-at-begin tokens. Greedy and
sampling apply them to logits, beam search to log-probabilities, as HF does. Each processor
costs nothing when no row uses it (a ``lax.cond`` on the batch).

A front end may add its own rule as a :data:`LogitsHook` (Whisper's timestamp rules): a pure
function of the scores and the :class:`DecodeContext`, applied before the request's processors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@flax.struct.dataclass
class DecodeContext:
    """Where each row is in its decoder sequence: what a :data:`LogitsHook` may read."""

    history_BT: jax.Array
    """Decoder tokens so far (int32): column ``t`` holds the token at position ``t``, the forced
    prefix included; -1 past ``length_B``."""
    length_B: jax.Array
    """Tokens in the history: the next token is chosen for position ``length_B``."""
    prefix_len_B: jax.Array
    """Forced prefix length (the start token included)."""
    num_generated_B: jax.Array
    """Tokens sampled so far (forced prefix tokens not counted)."""


LogitsHook = Callable[[jax.Array, DecodeContext], jax.Array]
"""``(scores_BV, ctx) -> scores_BV``: a front end's rule, a module-level pure function (it is
part of the compiled step's identity)."""


class ProcessorParams(Protocol):
    """Per-row processor parameters (the engine's ``SlotParams`` has these fields)."""

    repetition_penalty: jax.Array
    """float32; 1 is off."""
    no_repeat_ngram: jax.Array
    """int32 n-gram size; 0 is off."""
    min_new: jax.Array
    """EOS is banned until this many tokens are out."""
    max_new: jax.Array
    forced_bos: jax.Array
    """Token forced at the first sampled step; -1 is off."""
    forced_eos: jax.Array
    """Token forced at the last step (``max_new - 1`` tokens out); -1 is off."""
    suppress_X: jax.Array
    """Tokens banned at every step, padded with -1."""
    begin_suppress_X: jax.Array
    """Tokens banned at the first sampled step, padded with -1."""


def token_mask(ids_BX: jax.Array, vocab: int) -> jax.Array:
    """``[B, V]`` True at each row's ids (negative ids, the padding, mark nothing)."""
    B = ids_BX.shape[0]
    rows_BX = jnp.broadcast_to(jnp.arange(B)[:, None], ids_BX.shape)
    cols_BX = jnp.where(ids_BX < 0, vocab, ids_BX)  # out of range: dropped
    return jnp.zeros((B, vocab), bool).at[rows_BX, cols_BX].set(True, mode="drop")


def force_token(scores_BV: jax.Array, token_B: jax.Array, on_B: jax.Array) -> jax.Array:
    """Rows where ``on_B``: every score -inf but ``token_B``'s, which becomes 0 (HF's forced BOS/EOS)."""
    vocab_V = jnp.arange(scores_BV.shape[-1], dtype=jnp.int32)
    forced_BV = jnp.where(vocab_V[None, :] == token_B[:, None], 0.0, NEG_INF).astype(scores_BV.dtype)
    return jnp.where(on_B[:, None], forced_BV, scores_BV)


def repetition_penalty(scores_BV: jax.Array, history_BT: jax.Array, penalty_B: jax.Array) -> jax.Array:
    """HF's ``RepetitionPenaltyLogitsProcessor``: a token already in the sequence has its score
    divided by the penalty if positive, multiplied if negative."""
    seen_BV = token_mask(history_BT, scores_BV.shape[-1])
    p_B1 = penalty_B[:, None].astype(scores_BV.dtype)
    penalized_BV = jnp.where(scores_BV < 0, scores_BV * p_B1, scores_BV / p_B1)
    return jnp.where(seen_BV, penalized_BV, scores_BV)


def ngram_bans(history_BT: jax.Array, length_B: jax.Array, n_B: jax.Array, vocab: int) -> jax.Array:
    """``[B, V]`` tokens that would repeat an n-gram of the sequence (HF's ``NoRepeatNGramLogitsProcessor``).

    An n-gram starting at ``i`` (``i + n <= length``) whose first ``n - 1`` tokens equal the
    sequence's last ``n - 1`` bans its last token. Rows with ``n == 0`` ban nothing.
    """
    B, T = history_BT.shape
    i_T = jnp.arange(T, dtype=jnp.int32)
    tail_start_B = length_B - n_B + 1

    def match_next(j, match_BT):
        earlier_BT = history_BT[:, (i_T + j) % T]  # wrapped columns are never valid starts
        tail_B = jnp.take_along_axis(history_BT, jnp.clip(tail_start_B + j, 0, T - 1)[:, None], axis=1)
        return match_BT & ((j >= n_B - 1)[:, None] | (earlier_BT == tail_B))

    valid_BT = (n_B[:, None] > 0) & (i_T[None, :] <= (length_B - n_B)[:, None])
    match_BT = jax.lax.fori_loop(0, jnp.max(n_B) - 1, match_next, valid_BT)
    banned_BT = jnp.take_along_axis(history_BT, jnp.clip(i_T[None, :] + n_B[:, None] - 1, 0, T - 1), axis=1)
    return token_mask(jnp.where(match_BT, banned_BT, -1), vocab)


def _when(any_row: jax.Array, fn: Callable[[jax.Array], jax.Array], scores_BV: jax.Array) -> jax.Array:
    """``fn(scores)`` if any row needs it, else ``scores`` untouched (no cost)."""
    return jax.lax.cond(any_row, fn, lambda x: x, scores_BV)


def process_scores(
    scores_BV: jax.Array, ctx: DecodeContext, p: ProcessorParams, *, eos_token_id: int
) -> jax.Array:
    """Every row's processors in HF's order; rows with all defaults are returned unchanged."""
    V = scores_BV.shape[-1]
    n_B = ctx.num_generated_B
    first_B = n_B == 0
    scores_BV = _when(
        jnp.any(p.repetition_penalty != 1.0),
        lambda x: repetition_penalty(x, ctx.history_BT, p.repetition_penalty),
        scores_BV,
    )
    scores_BV = _when(
        jnp.any(p.no_repeat_ngram > 0),
        lambda x: jnp.where(ngram_bans(ctx.history_BT, ctx.length_B, p.no_repeat_ngram, V), NEG_INF, x),
        scores_BV,
    )
    if 0 <= eos_token_id < V:  # one column written, not a [B, V] select (most rows have a minimum)
        score_B = scores_BV[:, eos_token_id]
        banned_B = jnp.where(n_B < p.min_new, NEG_INF, score_B).astype(score_B.dtype)
        scores_BV = scores_BV.at[:, eos_token_id].set(banned_B)
    bos_B = first_B & (p.forced_bos >= 0)
    scores_BV = _when(jnp.any(bos_B), lambda x: force_token(x, p.forced_bos, bos_B), scores_BV)
    eos_B = (n_B == p.max_new - 1) & (p.forced_eos >= 0)
    scores_BV = _when(jnp.any(eos_B), lambda x: force_token(x, p.forced_eos, eos_B), scores_BV)
    scores_BV = _when(
        jnp.any(p.suppress_X >= 0),
        lambda x: jnp.where(token_mask(p.suppress_X, V), NEG_INF, x),
        scores_BV,
    )
    scores_BV = _when(
        jnp.any(first_B[:, None] & (p.begin_suppress_X >= 0)),
        lambda x: jnp.where(first_B[:, None] & token_mask(p.begin_suppress_X, V), NEG_INF, x),
        scores_BV,
    )
    return scores_BV
