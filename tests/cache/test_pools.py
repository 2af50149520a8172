"""Page pools: sizing, exact memory, page writes against NumPy, and writes done in place."""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encdec.cache import (
    SENTINEL_PAGE,
    PoolConfig,
    bytes_per_token_per_layer,
    init_pools,
    pool_bytes,
    write_layer_pages,
    write_layer_rows,
    write_pages,
    write_rows,
)
from encdec.config import ModelConfig
from pallas_kernels.put_rows.build import TARGET as PUT_ROWS_TARGET


def _model_cfg(layers=3, heads=4, head_dim=8) -> ModelConfig:
    """Only the decoder geometry matters to the pools."""
    fields = {f.name: 0 for f in dataclasses.fields(ModelConfig)}
    fields.update(model_type="t5", decoder_layers=layers, decoder_heads=heads, head_dim=head_dim)
    return ModelConfig(**fields)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_pool_memory_is_exactly_k_and_v_per_token_per_layer(dtype):
    cfg = _model_cfg(layers=3, heads=4, head_dim=8)
    itemsize = np.dtype(dtype).itemsize
    assert bytes_per_token_per_layer(cfg, dtype) == 2 * 4 * 8 * itemsize
    pc = PoolConfig.from_pages(cfg, page_size=4, num_self_pages=10, num_cross_pages=6, dtype=dtype)
    pools = init_pools(pc)
    L, G = 3, 4
    for name, P in [("self", 10), ("cross", 6)]:
        k, v = getattr(pools, f"{name}_k_LNPGH"), getattr(pools, f"{name}_v_LNPGH")
        assert k.dtype == v.dtype == np.dtype(dtype)
        assert k.shape == v.shape == (L, 4, P, G, 8)
        assert (k.nbytes + v.nbytes) == P * G * L * bytes_per_token_per_layer(cfg, dtype)
        assert pool_bytes(pc)[name] == k.nbytes + v.nbytes
    assert pools.nbytes == pool_bytes(pc)["total"]
    assert pc.page_bytes == G * L * bytes_per_token_per_layer(cfg, dtype)
    assert (pools.page_size, pools.num_self_pages, pools.num_cross_pages) == (4, 10, 6)


def test_budget_split_by_cross_fraction():
    cfg = _model_cfg()
    page_bytes = 3 * 8 * bytes_per_token_per_layer(cfg, np.float32)  # L * G * per-token
    budget = 100 * page_bytes + 17
    pc = PoolConfig.from_budget(cfg, memory_bytes=budget, page_size=8, cross_kv_fraction=0.25)
    assert (pc.num_cross_pages, pc.num_self_pages) == (25, 75)
    assert pool_bytes(pc)["total"] <= budget
    pc = PoolConfig.from_budget(
        cfg, memory_bytes=budget, page_size=8, cross_kv_fraction=0.5, dtype=jnp.bfloat16
    )
    assert (pc.num_cross_pages, pc.num_self_pages) == (100, 100)
    with pytest.raises(ValueError, match="at least 2"):
        PoolConfig.from_budget(cfg, memory_bytes=3 * page_bytes, page_size=8, cross_kv_fraction=0.5)
    with pytest.raises(ValueError, match="cross_kv_fraction"):
        PoolConfig.from_budget(cfg, memory_bytes=budget, page_size=8, cross_kv_fraction=1.0)
    with pytest.raises(ValueError, match="sentinel"):
        PoolConfig.from_pages(cfg, page_size=8, num_self_pages=1, num_cross_pages=4)
    hash(pc)  # a jit static argument


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("jit", [False, True])
def test_write_rows_matches_numpy_and_drops_sentinel_writes(jit):
    rng = np.random.default_rng(0)
    N, P, G, H, B = 2, 9, 4, 8, 6
    pool = _rand(rng, N, P, G, H)
    pool[:, SENTINEL_PAGE] = 0
    pages = np.array([3, 0, 5, 3, 0, 8])  # two inactive slots address the sentinel
    offsets = np.array([1, 2, 0, 2, 2, 3])
    rows = _rand(rng, B, N, H)
    fn = jax.jit(write_rows) if jit else write_rows
    out = np.asarray(fn(jnp.asarray(pool), jnp.asarray(pages), jnp.asarray(offsets), jnp.asarray(rows)))
    expected = pool.copy()
    for b in range(B):
        if pages[b] != SENTINEL_PAGE:
            expected[:, pages[b], offsets[b]] = rows[b]
    np.testing.assert_array_equal(out, expected)
    assert not out[:, SENTINEL_PAGE].any()


def test_write_layer_rows_touches_only_its_layer():
    rng = np.random.default_rng(1)
    L, N, P, G, H = 3, 2, 7, 4, 8
    pool = _rand(rng, L, N, P, G, H)
    pages, offsets, rows = np.array([2, 0, 6]), np.array([3, 0, 1]), _rand(rng, 3, N, H)
    out = np.asarray(write_layer_rows(jnp.asarray(pool), 1, jnp.asarray(pages), jnp.asarray(offsets), rows))
    np.testing.assert_array_equal(out[[0, 2]], pool[[0, 2]])
    np.testing.assert_array_equal(out[1], np.asarray(write_rows(jnp.asarray(pool[1]), pages, offsets, rows)))


def _pages_reference(pool_NPGH, table_BM, k_BSNH, lengths_B):
    out = pool_NPGH.copy()
    G = pool_NPGH.shape[2]
    for b, length in enumerate(lengths_B):
        for s in range(length):
            out[:, table_BM[b, s // G], s % G] = k_BSNH[b, s]
        last = length % G
        if last:  # the tail of the last page holds the padding positions (or zeros past S)
            for s in range(length, length - last + G):
                row = k_BSNH[b, s] if s < k_BSNH.shape[1] else 0
                out[:, table_BM[b, s // G], s % G] = row
    return out


def test_write_pages_matches_numpy():
    rng = np.random.default_rng(2)
    N, P, G, H = 2, 12, 4, 8
    pool = np.zeros((N, P, G, H), np.float32)
    pool[:, 1:] = _rand(rng, N, P - 1, G, H)  # stale data outside the written pages survives
    lengths = np.array([9, 0, 4, 1])
    table = np.zeros((4, 3), np.int64)
    table[0] = [7, 2, 11]
    table[2] = [5, 0, 0]
    table[3] = [9, 0, 0]
    table[1] = [4, 6, 0]  # a length-0 row's stale entries must not be written
    k = _rand(rng, 4, 10, N, H)  # S = 10 < M * G = 12
    out = np.asarray(jax.jit(write_pages)(jnp.asarray(pool), table, jnp.asarray(k), lengths))
    np.testing.assert_array_equal(out, _pages_reference(pool, table, k, lengths))
    np.testing.assert_array_equal(out[:, [4, 6]], pool[:, [4, 6]])
    assert not out[:, SENTINEL_PAGE].any()
    with pytest.raises(ValueError, match="do not fit"):
        write_pages(jnp.asarray(pool), table[:, :2], jnp.asarray(k), lengths)


def test_write_layer_pages_equals_write_pages_per_layer():
    rng = np.random.default_rng(3)
    L, N, P, G, H, B, S = 3, 2, 10, 4, 8, 3, 7
    pool = jnp.asarray(_rand(rng, L, N, P, G, H))
    table = jnp.asarray([[3, 8], [0, 0], [1, 6]])
    lengths = jnp.asarray([7, 0, 5])
    k_LBSNH = _rand(rng, L, B, S, N, H)
    out = np.asarray(write_layer_pages(pool, table, jnp.asarray(k_LBSNH), lengths))
    for layer in range(L):
        np.testing.assert_array_equal(out[layer], write_pages(pool[layer], table, k_LBSNH[layer], lengths))


def _entry_lines(hlo: str) -> list[str]:
    entry = hlo[hlo.index("\nENTRY") :]
    return entry[: entry.index("\n}")].splitlines()


def full_size_values(hlo: str, shape: tuple[int, ...]) -> list[str]:
    """Entry-computation values of ``shape`` (any dtype) other than parameters, scatters and the
    row writer's custom call that aliases its operand.

    In a step that writes a donated pool in place, the only pool-sized values are the
    parameter and the writes on it; a copy, a convert or any other full-size fusion is not.
    """
    dims = "[" + ",".join(map(str, shape)) + "]"
    found = []
    for line in _entry_lines(hlo):
        m = re.match(r"\s*(?:ROOT )?%(\S+) = [a-z0-9]+(\[[0-9,]*\])\S* ([\w-]+)\(", line)
        if m and m.group(2) == dims and m.group(3) not in ("parameter", "bitcast", "get-tuple-element"):
            aliased = "output_to_operand_aliasing" in line
            aliased_put = m.group(3) == "custom-call" and PUT_ROWS_TARGET in line and aliased
            if not ("scatter" in m.group(1) or m.group(3) == "scatter" or aliased_put):
                found.append(line.strip()[:160])
    return found


def _assert_in_place(fn, pool, *args, pool_arg=0):
    """``fn`` (jitted, pool donated) aliases the pool to its output and never copies it."""
    hlo = fn.lower(pool, *args).compile().as_text()
    aliases = re.search(r"input_output_alias=\{([^\n]*?)\}\s*,\s*entry", hlo)
    assert aliases and f"({pool_arg}, {{}}" in aliases.group(1), (
        "the donated pool is not aliased to the output"
    )
    copies = full_size_values(hlo, pool.shape)
    assert not copies, f"the pool is copied: {copies}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable" fails the test
        out = fn(pool, *args)
    assert pool.is_deleted(), "the donated pool buffer is still alive: the write copied it"
    return out


def test_decode_step_row_write_is_in_place():
    L, N, P, G, H = 2, 4, 64, 8, 16
    k = jnp.zeros((L, N, P, G, H), jnp.float32)
    pages, offsets = jnp.asarray([5, 0, 9]), jnp.asarray([0, 3, 7])
    rows = jnp.ones((3, N, H), jnp.float32)
    step = jax.jit(write_layer_rows, static_argnums=1, donate_argnums=0)
    out = _assert_in_place(step, k, 1, pages, offsets, rows)
    assert float(out[1, :, 9, 7].sum()) == N * H and float(out.sum()) == 2 * N * H

    k = jnp.zeros((N, P, G, H), jnp.float32)
    out = _assert_in_place(jax.jit(write_rows, donate_argnums=0), k, pages, offsets, rows)
    assert float(out.sum()) == 2 * N * H


def test_cross_page_write_is_in_place():
    L, N, P, G, H, B, S = 2, 4, 32, 8, 16, 2, 20
    k = jnp.zeros((L, N, P, G, H), jnp.float32)
    table = jnp.asarray([[4, 5, 6], [7, 0, 0]])
    lengths = jnp.asarray([20, 3])
    k_LBSNH = jnp.ones((L, B, S, N, H), jnp.float32)
    out = _assert_in_place(jax.jit(write_layer_pages, donate_argnums=0), k, table, k_LBSNH, lengths)
    # Whole pages: row 0's third page ends in the zero padding past S; row 1's page is all ones.
    assert float(out.sum()) == L * N * H * (S + G)
