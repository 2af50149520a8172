"""The window attention CPU kernel against its pure-JAX reference: head sizes with and without
a vector tail, empty and full slots, the T5 distance bias past max_distance, the threaded split,
rows past a length that hold NaN; its errors; and that the engine's window path reaches it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention.reference import relative_bias_BNK
from pallas_kernels.window_attention import (
    build,
    distance_bias_NK,
    kernel_available,
    window_attention,
    window_attention_reference,
)

needs_kernel = pytest.mark.skipif(
    bool(build.cpu_missing()), reason=f"this CPU lacks {', '.join(build.cpu_missing())}"
)


def _operands(B, N, K, H, lengths, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, H), np.float32)
    k = rng.standard_normal((B, N, K, H), np.float32)
    v = rng.standard_normal((B, N, K, H), np.float32)
    return q, k, v, np.asarray(lengths, np.int32)


@needs_kernel
def test_the_kernel_builds_where_the_cpu_has_avx512():
    assert build.register() is None
    assert kernel_available()


@needs_kernel
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize(
    "B, N, K, H, lengths",
    [
        (1, 1, 1, 64, [1]),  # one key
        (3, 2, 37, 64, [0, 1, 37]),  # an empty slot, one key, a full window (a 16-key tail)
        (2, 3, 20, 40, [20, 7]),  # a head size with a vector tail
        (2, 1, 33, 16, [33, 32]),
        (2, 2, 17, 256, [17, 9]),  # the largest head size
        (8, 8, 300, 64, [300, 5, 129, 0, 200, 64, 1, 299]),  # threaded; distances past max_distance
        (2, 2, 12, 64, [40, -3]),  # a length past the window is the window; below zero, none
        (4, 6, 50, 32, [50, 3, 0, 17]),  # heads attended 4 then 2 at a time
    ],
)
def test_kernel_equals_the_reference(B, N, K, H, lengths, biased):
    if biased and max(lengths) > K:
        pytest.skip("the bias of a query past the window is undefined (the engine's lengths fit it)")
    q, k, v, lengths_B = _operands(B, N, K, H, lengths, seed=B * 100 + K)
    bias_NR = np.random.default_rng(K).standard_normal((N, 32), np.float32) if biased else None
    fn = jax.jit(
        lambda q, k, v, n, bias, impl: window_attention(
            q, k, v, n, scale=0.125, bias_NR=bias, max_distance=128, implementation=impl
        ),
        static_argnums=5,
    )
    got = np.asarray(fn(q, k, v, lengths_B, bias_NR, "kernel"))
    want = np.asarray(fn(q, k, v, lengths_B, bias_NR, "xla"))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert not np.any(got[np.asarray(lengths) <= 0])  # no keys: zeros, as the reference


@needs_kernel
@pytest.mark.parametrize(
    "B, N, K, H, lengths",
    [(3, 2, 37, 64, [0, 1, 37]), (2, 3, 20, 40, [20, 7]), (8, 8, 300, 64, [300, 5, 129, 0, 200, 64, 1, 299])],
)
def test_bfloat16_keys_and_values_are_read_as_their_float32_values(B, N, K, H, lengths):
    """A bfloat16 window (half the bytes a step reads): the kernel widens each element exactly,
    so it equals the float32 kernel and the reference over the same values widened."""
    q, k, v, lengths_B = _operands(B, N, K, H, lengths, seed=K)
    bias_NR = np.random.default_rng(K).standard_normal((N, 32), np.float32)
    k16, v16 = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    lengths_B = np.minimum(lengths_B, K)

    def run(k, v, impl):
        out = window_attention(q, k, v, lengths_B, scale=0.125, bias_NR=bias_NR, implementation=impl)
        return np.asarray(out)

    got = run(k16, v16, "kernel")
    np.testing.assert_array_equal(got, run(k16.astype(jnp.float32), v16.astype(jnp.float32), "kernel"))
    want = run(k16.astype(jnp.float32), v16.astype(jnp.float32), "xla")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(run(k16, v16, "xla"), want, rtol=2e-5, atol=2e-6)


@needs_kernel
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("N, H", [(3, 64), (6, 32)])  # one head at a time; 4 + 2 (of 2 queries)
def test_slots_reading_another_slots_rows(biased, N, H):
    # Beam groups read their leader's cross rows: a group of 5 (split 3 + 2), of 3, a lone slot,
    # a group whose members differ in length, an empty member; the other slots' rows are NaN
    # (never written: only a group's leader holds its rows).
    source = [0, 0, 0, 0, 0, 5, 5, 5, 8, 9, 9, 9, 12]
    lengths = [30, 30, 30, 30, 30, 7, 7, 7, 40, 12, 20, 0, 1]
    B, K = len(source), 40
    q, k, v, lengths_B = _operands(B, N, K, H, lengths, seed=7)
    stale_k, stale_v = k.copy(), v.copy()
    readers = sorted(set(range(B)) - set(source))
    stale_k[readers], stale_v[readers] = np.nan, np.nan
    bias_NR = np.random.default_rng(1).standard_normal((N, 32), np.float32) if biased else None
    source_B = np.asarray(source, np.int32)
    def attend(k, v, source_B, implementation):
        out = window_attention(
            q, k, v, lengths_B, bias_NR=bias_NR, source_B=source_B, implementation=implementation
        )
        return np.asarray(out)

    got = attend(stale_k, stale_v, source_B, "kernel")
    np.testing.assert_allclose(got, attend(k, v, source_B, "xla"), rtol=2e-5, atol=2e-6)
    own = attend(k[source_B], v[source_B], None, "kernel")
    np.testing.assert_allclose(got, own, rtol=2e-5, atol=2e-6)  # as if each slot held the rows


@needs_kernel
def test_rows_past_a_length_are_never_read():
    # The window's rows past a slot's length may hold an earlier occupant's values; the kernel
    # must not let even NaN through (the reference needs them finite, so it gets zeros).
    q, k, v, lengths_B = _operands(4, 2, 24, 64, [24, 10, 1, 0], seed=3)
    past_BK = np.arange(24)[None, :] >= lengths_B[:, None]
    stale_k, stale_v = k.copy(), v.copy()
    stale_k[past_BK[:, None, :, None].repeat(2, 1).repeat(64, 3)] = np.nan
    stale_v[past_BK[:, None, :, None].repeat(2, 1).repeat(64, 3)] = np.nan
    clean_v = np.where(np.isnan(stale_v), 0.0, stale_v)
    got = np.asarray(window_attention(q, stale_k, stale_v, lengths_B, implementation="kernel"))
    want = np.asarray(window_attention_reference(q, np.nan_to_num(stale_k), clean_v, lengths_B))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_the_distance_table_is_the_reference_bias():
    bias_NR = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32), np.float32))
    lengths_B = jnp.asarray([1, 9, 200], jnp.int32)
    K = 200
    want_BNK = relative_bias_BNK(bias_NR, lengths_B, K, max_distance=64)
    table_NK = distance_bias_NK(bias_NR, K, max_distance=64)
    for b, L in enumerate(np.asarray(lengths_B)):
        np.testing.assert_array_equal(want_BNK[b, :, :L], table_NK[:, L - 1 :: -1][:, :L])


def test_bad_operands_are_named():
    q, k, v, lengths_B = _operands(2, 2, 8, 64, [8, 8], seed=0)
    with pytest.raises(ValueError, match="unknown implementation 'pallas'"):
        window_attention(q, k, v, lengths_B, implementation="pallas")
    if kernel_available():
        with pytest.raises(TypeError, match="float32"):
            window_attention(q.astype(jnp.bfloat16), k, v, lengths_B, implementation="kernel")
        with pytest.raises(TypeError, match="bfloat16 k and v"):  # k and v of two dtypes
            window_attention(q, k.astype(jnp.bfloat16), v, lengths_B, implementation="kernel")
