"""One step of beam search on device, for every beam group of a batch at once (HF's algorithm).

A request with ``k`` beams holds ``k`` slots (its *group*); each slot is a beam. Every slot
computes its own group's selection from gathered per-slot candidates (the group's work is
repeated ``k`` times, on arrays of ``K x 2K`` numbers, so no slot waits for another), then takes
its own share: the beam it continues (``parent``), its next token, its new score, and its entry
of the group's finished hypotheses. This is ``GenerationMixin._beam_search`` of transformers
5: the best ``2k`` continuations of the ``k x V`` candidates, the best ``k`` unfinished ones
continue, finished ones among the first ``k`` enter a ``k``-entry buffer of hypotheses scored
``sum(logprobs) / length ** length_penalty``, and the group stops by HF's early-stopping rules.

Letters: ``K`` the static group width, ``C = 2K`` candidates, ``M = K + C`` merged entries.
"""

from __future__ import annotations

from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp

NO_SCORE = -1.0e9


class BeamParams(Protocol):
    """Per-slot beam fields (the engine's ``SlotParams`` has these)."""

    num_beams: jax.Array
    group_X: jax.Array
    beam_index: jax.Array
    length_penalty: jax.Array
    early_stopping: jax.Array
    """0: False (HF's heuristic), 1: True, 2: ``"never"``."""
    max_new: jax.Array
    stop_ids_X: jax.Array


@flax.struct.dataclass
class BeamChoice:
    """What one beam slot does next."""

    parent_B: jax.Array
    """The slot whose sequence this beam continues (its pages, history and log-probabilities)."""
    token_B: jax.Array
    token_logprob_B: jax.Array
    score_B: jax.Array
    """Running score (with HF's -1e9 for a continuation that had finished)."""
    open_B: jax.Array
    done_B: jax.Array
    """The group has finished: no more steps."""


@flax.struct.dataclass
class HypothesisRows:
    """The group's finished-hypothesis entry each slot holds after this step."""

    source_B: jax.Array
    """The slot whose old entry it keeps, or -1: a new hypothesis (parent's sequence + token)."""
    parent_B: jax.Array
    token_B: jax.Array
    token_logprob_B: jax.Array
    score_B: jax.Array
    finished_B: jax.Array


def _take(x_BX: jax.Array, i_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BX, i_B[:, None], axis=1)[:, 0]


def _places(parent_BK: jax.Array, k_B: jax.Array, beam_index_B: jax.Array) -> jax.Array:
    """Which of the ranked continuations (``parent_BK``: each one's beam, in group order) the
    slot at ``beam_index_B`` takes: a beam's best continuation stays in that beam's slot, the
    others fill the slots of beams without one, in rank order.

    Beam order is not HF's ranking (nothing reads it: the ranking is recomputed from scores every
    step), and in return a beam's rows move only into slots whose beam ended, never into a slot
    they are read from: the rows are copied in place (``SlotWindow.take_self_rows``).
    """
    K = parent_BK.shape[1]
    ar_K = jnp.arange(K)
    ok_BK = ar_K[None, :] < k_B[:, None]
    same_BKK = parent_BK[:, :, None] == parent_BK[:, None, :]
    first_BK = ok_BK & ~jnp.any(same_BKK & (ar_K[None, :] < ar_K[:, None])[None], axis=2)
    held_BK = jnp.any(first_BK[:, :, None] & (parent_BK[:, :, None] == ar_K[None, None, :]), axis=1)
    free_BK = ok_BK & ~held_BK  # slots (group order) whose beam has no continuation
    extra_rank_BK = jnp.cumsum(ok_BK & ~first_BK, axis=1) - 1
    free_rank_BK = jnp.cumsum(free_BK, axis=1) - 1
    fills_BKK = free_BK[:, None, :] & (free_rank_BK[:, None, :] == extra_rank_BK[:, :, None])
    slot_BK = jnp.where(first_BK, parent_BK, jnp.argmax(fills_BKK, axis=2))
    return jnp.argmax(ok_BK & (slot_BK == beam_index_B[:, None]), axis=1)


def beam_step(
    logprobs_BV: jax.Array,
    score_B: jax.Array,
    num_generated_B: jax.Array,
    open_B: jax.Array,
    hyp_score_B: jax.Array,
    hyp_finished_B: jax.Array,
    p: BeamParams,
    *,
    eos_token_id: int,
) -> tuple[BeamChoice, HypothesisRows]:
    """Choose every beam's continuation and update its group's hypotheses.

    ``logprobs_BV`` are the processed log-probabilities of this step, ``score_B`` each beam's
    running score, ``num_generated_B`` the tokens generated before this step. Rows outside beam
    search get meaningless values (the caller ignores them).
    """
    B, V = logprobs_BV.shape
    K = p.group_X.shape[1]
    C = 2 * K
    k_B = p.num_beams
    f32 = jnp.float32

    # Each slot's best C continuations, then the group's best C of its K x C.
    vals_BC, toks_BC = jax.lax.top_k(logprobs_BV + score_B[:, None], C)
    beam_ok_BK = (jnp.arange(K)[None, :] < k_B[:, None]) & (p.group_X >= 0)
    member_BK = jnp.clip(p.group_X, 0, B - 1)
    group_vals = jnp.where(beam_ok_BK[..., None], vals_BC[member_BK], -jnp.inf).reshape(B, K * C)
    top_vals_BC, top_i_BC = jax.lax.top_k(group_vals, C)
    cand_beam_BC = top_i_BC // C
    cand_tok_BC = jnp.take_along_axis(toks_BC[member_BK].reshape(B, K * C), top_i_BC, axis=1)
    cand_ok_BC = jnp.arange(C)[None, :] < 2 * k_B[:, None]
    stop_BC = (cand_tok_BC == eos_token_id) | jnp.any(cand_tok_BC[..., None] == p.stop_ids_X[:, None, :], -1)
    hits_BC = stop_BC | (num_generated_B + 1 >= p.max_new)[:, None]

    # The best k unfinished continuations go on, each in the slot _places gives it.
    run_vals_BC = jnp.where(cand_ok_BC, top_vals_BC + hits_BC.astype(f32) * NO_SCORE, -jnp.inf)
    sel_vals_BK, sel_BK = jax.lax.top_k(run_vals_BC, K)
    rank_B = _places(jnp.take_along_axis(cand_beam_BC, sel_BK, axis=1), k_B, p.beam_index)
    mine_B = _take(sel_BK, rank_B)
    parent_B = _take(member_BK, _take(cand_beam_BC, mine_B))
    token_B = _take(cand_tok_BC, mine_B)
    token_lp_B = logprobs_BV[parent_B, token_B]

    # Finished candidates among the first k enter the hypotheses (HF's additive -1e9 masks).
    length_B = (num_generated_B + 1).astype(f32)
    fin_vals_BC = top_vals_BC / (length_B ** p.length_penalty)[:, None]
    old_ok_BK = beam_ok_BK
    old_vals_BK = jnp.where(old_ok_BK, hyp_score_B[member_BK], -jnp.inf)
    old_fin_BK = hyp_finished_B[member_BK] & old_ok_BK
    full_B = jnp.all(old_fin_BK | ~old_ok_BK, axis=1) & (p.early_stopping == 1)
    just_fin_BC = hits_BC & (jnp.arange(C)[None, :] < k_B[:, None])
    fin_vals_BC = fin_vals_BC + full_B[:, None].astype(f32) * NO_SCORE
    fin_vals_BC = fin_vals_BC + (~open_B)[:, None].astype(f32) * NO_SCORE
    fin_vals_BC = fin_vals_BC + (~just_fin_BC).astype(f32) * NO_SCORE
    fin_vals_BC = jnp.where(cand_ok_BC, fin_vals_BC, -jnp.inf)
    merged_vals_BM = jnp.concatenate([old_vals_BK, fin_vals_BC], axis=1)
    merged_fin_BM = jnp.concatenate([old_fin_BK, just_fin_BC], axis=1)
    kept_vals_BK, kept_BK = jax.lax.top_k(merged_vals_BM, K)
    kept_fin_BK = jnp.take_along_axis(merged_fin_BM, kept_BK, axis=1)
    entry_B = _take(kept_BK, p.beam_index)
    c_B = jnp.clip(entry_B - K, 0, C - 1)
    hyp_parent_B = _take(member_BK, _take(cand_beam_BC, c_B))
    hyp_token_B = _take(cand_tok_BC, c_B)
    hyps = HypothesisRows(
        source_B=jnp.where(entry_B < K, _take(member_BK, jnp.clip(entry_B, 0, K - 1)), -1),
        parent_B=hyp_parent_B,
        token_B=hyp_token_B,
        token_logprob_B=logprobs_BV[hyp_parent_B, hyp_token_B],
        score_B=_take(kept_vals_BK, p.beam_index),
        finished_B=_take(kept_fin_BK, p.beam_index),
    )

    # Can the running beams still beat the worst finished hypothesis? (after HF's cur_len += 1)
    never_B = (p.early_stopping == 2) & (p.length_penalty > 0)
    best_len_B = jnp.where(never_B, p.max_new, num_generated_B + 1).astype(f32)
    best_possible_B = sel_vals_BK[:, 0] / best_len_B ** p.length_penalty
    entry_ok_BK = jnp.arange(K)[None, :] < k_B[:, None]
    worst_B = jnp.min(jnp.where(entry_ok_BK, kept_vals_BK, jnp.inf), axis=1)
    worst_BK = jnp.where(kept_fin_BK, worst_B[:, None], NO_SCORE)
    new_open_B = open_B & jnp.any(entry_ok_BK & (best_possible_B[:, None] > worst_BK), axis=1)
    all_fin_B = jnp.all(kept_fin_BK | ~entry_ok_BK, axis=1)
    all_hit_B = jnp.all(hits_BC | ~cand_ok_BC, axis=1)
    done_B = ~(new_open_B & ~(all_fin_B & (p.early_stopping == 1)) & ~all_hit_B)
    choice = BeamChoice(
        parent_B=parent_B,
        token_B=token_B,
        token_logprob_B=token_lp_B,
        score_B=_take(sel_vals_BK, rank_B),
        open_B=new_open_B,
        done_B=done_B,
    )
    return choice, hyps
