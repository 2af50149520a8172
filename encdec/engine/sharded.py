"""The engine's device state and jitted steps over a ``(data, model)`` mesh.

The steps are :mod:`encdec.engine.steps`' own functions, run once per data shard
(:func:`encdec.sharding.over_data`): a shard sees its block of slots, its block of each page pool
and the encoder rows of the requests it owns, with page ids and group slot ids local to it, so
nothing of the paged cache crosses shards. Inside, ``model`` stays automatic: the parameters'
shardings make XLA split heads, MLP units and vocabulary over the shard's model devices. The
state keeps one layout from step to step (every step's output sharding is the state's), so
nothing is resharded between dispatches.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from encdec.cache.pools import PoolConfig, init_pools
from encdec.engine.slots import DecodeState, SlotShape, init_state
from encdec.engine.steps import (
    JittedSteps,
    StepResults,
    decode_steps,
    encode_insert,
    grant_pages,
    insert_shared,
    release_slots,
)
from encdec.sharding import DATA, MODEL, over_data


def heads_split(mesh: Mesh, num_heads: int) -> bool:
    """Whether the pools (and attention weights) split their heads over ``model``."""
    return num_heads % mesh.shape[MODEL] == 0


def state_specs(state: Any, *, split_heads: bool, manual_only: bool = False) -> DecodeState:
    """Partition specs of a :class:`DecodeState` (or its shape tree): pools ``[L, N, P, G, H]`` with
    pages on ``data`` and heads on ``model``, every other field's slot axis on ``data``.

    ``manual_only``: only the ``data`` axis (what ``shard_map`` is told; ``model`` is automatic).
    """
    heads = MODEL if split_heads and not manual_only else None
    specs = jax.tree.map(lambda _: P(DATA), state)
    specs = specs.replace(pools=jax.tree.map(lambda _: P(None, heads, DATA), state.pools))
    if state.window is not None:  # [B, N, K, H] per layer
        specs = specs.replace(window=jax.tree.map(lambda _: P(DATA, heads), state.window))
    return specs


def sharded_state(
    pool_config: PoolConfig,
    num_slots: int,
    shape: SlotShape,
    mesh: Mesh,
    *,
    window: bool = False,
    window_dtype: str | None = None,
) -> DecodeState:
    """A fresh :class:`DecodeState` created in place on the mesh (no full copy on any device)."""

    def make():
        return init_state(init_pools(pool_config), num_slots, shape, window=window, window_dtype=window_dtype)

    split = heads_split(mesh, pool_config.num_heads)
    specs = state_specs(jax.eval_shape(make), split_heads=split)
    return jax.jit(make, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))()


@functools.lru_cache(maxsize=32)
def sharded_steps(
    mesh: Mesh,
    num_heads: int,
    cfg,
    dtype: str,
    num_steps: int,
    top_logprobs: int,
    implementation: str,
    encoder,
    hook,
    lora_gather,
) -> JittedSteps:
    """The steps :func:`~encdec.engine.steps.jitted_steps` makes (same signatures, the state
    donated) over ``mesh``: ``encode``, ``insert`` and ``decode`` per data shard (their slot ids
    local to it), ``release`` and ``grant`` on the whole state (global slot ids: they only
    write slot rows, and a granted page id is already local to the slot's shard)."""
    split = heads_split(mesh, num_heads)

    def specs_of(state, manual_only):
        return state_specs(state, split_heads=split, manual_only=manual_only)

    def shardings_of(state):
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs_of(state, False))

    lora_kw = {} if lora_gather is None else {"lora_gather": lora_gather}
    dt = jax.numpy.dtype(dtype)
    encode_fn = functools.partial(encode_insert, cfg=cfg, dtype=dt, encoder=encoder, **lora_kw)
    decode_fn = functools.partial(
        decode_steps,
        cfg=cfg,
        dtype=jax.numpy.dtype(dtype),
        num_steps=num_steps,
        implementation=implementation,
        top_logprobs=top_logprobs,
        hook=hook,
        **lora_kw,
    )

    def encode(params, state, inputs, slot_bK, self_pages_bKM, rows, lora_bank=None, *, prefill_width=0):
        specs = specs_of(state, True)
        rows_in = (P(DATA),) * 4
        fn = functools.partial(encode_fn, prefill_width=prefill_width)
        run = over_data(fn, mesh, (P(), specs, *rows_in, P()), specs)
        state = run(params, state, inputs, slot_bK, self_pages_bKM, rows, lora_bank)
        return jax.lax.with_sharding_constraint(state, shardings_of(state))

    def insert(state, slot_bK, self_pages_bKM, rows):
        specs = specs_of(state, True)
        run = over_data(insert_shared, mesh, (specs, P(DATA), P(DATA), P(DATA)), specs)
        state = run(state, slot_bK, self_pages_bKM, rows)
        return jax.lax.with_sharding_constraint(state, shardings_of(state))

    def decode(params, state, steps, lora_bank=None, masks=None):
        specs = specs_of(state, True)
        results = P(None, DATA)  # [S, B, ...]: steps, then slots
        out_specs = (specs, _results_specs(results))
        run = over_data(decode_fn, mesh, (P(), specs, P(), P(), P()), out_specs)
        state, out = run(params, state, steps, lora_bank, masks)
        return jax.lax.with_sharding_constraint(state, shardings_of(state)), out

    def release(state, release_B):
        return jax.lax.with_sharding_constraint(release_slots(state, release_B), shardings_of(state))

    def grant(state, slot_X, index_X, page_X):
        state = grant_pages(state, slot_X, index_X, page_X)
        return jax.lax.with_sharding_constraint(state, shardings_of(state))

    donated = functools.partial(jax.jit, donate_argnames=("state",))
    encode = jax.jit(encode, donate_argnames=("state",), static_argnames=("prefill_width",))
    return JittedSteps(encode, donated(insert), donated(decode), donated(release), donated(grant))


def _results_specs(per_step: P) -> StepResults:
    return StepResults(
        tokens_SB=per_step,
        logprob_SB=per_step,
        top_ids_SBX=per_step,
        top_logprobs_SBX=per_step,
        watched_logprob_SB=per_step,
        hyps=P(DATA),
    )
