"""The Pallas paged-attention kernel runs per device on its heads (``shard_map`` over ``model``)
inside the engine's per-data-shard step, and equals the XLA reference; nothing crosses devices.

Interpret mode (the only way to run Pallas on CPU): the same kernel code the GPU runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from encdec.cache.paged_kv import PagedKV
from encdec.cache.pools import PagePools
from encdec.sharding import DATA, MODEL, make_mesh, over_data
from tests.sharding.test_collectives import collectives

L, N, PAGES, G, H, B, M = 2, 4, 6, 4, 8, 4, 3  # per data shard: B slots, PAGES pages


def _inputs(rng):
    pool = lambda: rng.standard_normal((L, N, 2 * PAGES, G, H)).astype(np.float32)  # noqa: E731
    pools = PagePools(pool(), pool(), pool(), pool())
    table = rng.integers(1, PAGES, (2 * B, M)).astype(np.int32)  # page ids local to each shard
    lengths = rng.integers(0, M * G, 2 * B).astype(np.int32)
    q = rng.standard_normal((2 * B, 1, N, H)).astype(np.float32)
    bias = rng.standard_normal((N, 12)).astype(np.float32)
    return pools, table, lengths, q, bias


def _attend(implementation, interpret):
    def run(pools, table, lengths, q, bias):
        kv = PagedKV(
            pools=pools, self_page_table_BM=table, self_lengths_B=lengths, cross_page_table_BM=table,
            cross_lengths_B=lengths, active_B=lengths > 0, implementation=implementation, interpret=interpret,
        )
        out = kv.cross_attention(1, q, scale=0.5)
        own, _ = kv.self_attention(0, q, q, q, lengths[:, None], scale=0.5, bias_NR=bias, max_distance=20)
        return out, own

    return run


def test_pallas_per_head_shard_equals_xla_reference():
    mesh = make_mesh((2, 4))
    pools, table, lengths, q, bias = _inputs(np.random.default_rng(0))
    pool_spec, rows = P(None, None, DATA), P(DATA)
    in_specs = (pool_spec, rows, rows, rows, P())
    sharded = jax.jit(over_data(_attend("pallas", True), mesh, in_specs, (rows, rows)))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = (
        jax.tree.map(lambda x: put(x, P(None, MODEL, DATA)), pools),
        put(table, rows), put(lengths, rows), put(q, P(DATA, None, MODEL)), put(bias, P(MODEL)),
    )
    out, own = sharded(*args)
    # The reference: each data shard alone on one device, its own block of pages.
    for d in range(2):
        block = jax.tree.map(lambda x, d=d: x[:, :, d * PAGES : (d + 1) * PAGES], pools)
        rs = slice(d * B, (d + 1) * B)
        ref_out, ref_own = jax.jit(_attend("xla", False))(block, table[rs], lengths[rs], q[rs], bias)
        np.testing.assert_allclose(np.asarray(out)[rs], ref_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(own)[rs], ref_own, rtol=2e-5, atol=2e-5)
    assert jnp.abs(out).max() > 0
    assert collectives(sharded.lower(*args).compile().as_text()) == []
