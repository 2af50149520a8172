"""The row writer's CPU kernel against its reference (XLA's scatter): window- and pool-shaped
destinations, every element width the caches use, rows that miss the destination dropped, and
the write made in place on a donated buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.put_rows import kernel_available, put_rows, put_rows_reference
from pallas_kernels.put_rows.build import TARGET

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="the row writer kernel did not build")


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.uint16])
# a window [B, N, K, H]; a pool [L, N, P, G, H]
@pytest.mark.parametrize("shape", [(5, 3, 17, 8), (2, 3, 4, 6, 8)])
def test_kernel_equals_the_reference(dtype, shape):
    rng = np.random.default_rng(len(shape))
    A, N, H = shape[0], shape[1], shape[-1]
    C = int(np.prod(shape[2:-1]))
    dst = jnp.asarray(rng.integers(0, 200, shape)).astype(dtype)
    # In range; a is out (A, and negative: no counting from the end); c past the end, negative.
    a = jnp.asarray([0, A - 1, A, -1, 1, 1, 0], jnp.int32)
    c = jnp.asarray([0, C - 1, 2, 2, C, -1, 5], jnp.int32)
    rows = jnp.asarray(rng.integers(300, 400, (7, N, H))).astype(dtype)
    got = np.asarray(jax.jit(lambda d, r: put_rows(d, r, a, c, implementation="kernel"))(dst, rows))
    want = np.asarray(put_rows_reference(dst, rows, a, c))
    np.testing.assert_array_equal(got, want)
    flat = want.reshape(A, N, C, H)
    np.testing.assert_array_equal(flat[0, :, 0], np.asarray(rows[0]))
    np.testing.assert_array_equal(flat[A - 1, :, C - 1], np.asarray(rows[1]))
    np.testing.assert_array_equal(flat[0, :, 5], np.asarray(rows[6]))
    assert (flat >= 250).sum() == 3 * N * H  # the four rows that miss are dropped


@needs_kernel
def test_a_donated_destination_is_written_in_place():
    dst = jnp.zeros((4, 2, 64, 8), jnp.float32)
    rows = jnp.ones((4, 2, 8), jnp.float32)
    fn = jax.jit(lambda d, r, a, c: put_rows(d, r, a, c, implementation="kernel"), donate_argnums=0)
    a, c = jnp.arange(4, dtype=jnp.int32), jnp.asarray([3, 0, 63, 64], jnp.int32)
    hlo = fn.lower(dst, rows, a, c).compile().as_text()
    assert TARGET in hlo and " copy(" not in hlo
    out = fn(dst, rows, a, c)
    assert dst.is_deleted()
    assert float(out.sum()) == 3 * 2 * 8 and float(out[2, :, 63].sum()) == 16


def test_bad_arguments_are_refused():
    dst = jnp.zeros((2, 3, 4, 8), jnp.float32)
    a = c = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="unknown implementation"):
        put_rows(dst, jnp.zeros((2, 3, 8)), a, c, implementation="pallas")
    with pytest.raises(ValueError, match=r"want \[B, 3, 8\]"):
        put_rows(dst, jnp.zeros((2, 3, 9)), a, c)
    with pytest.raises(ValueError, match=r"\[A, N, C\.\.\., H\]"):
        put_rows(jnp.zeros((3, 4, 8)), jnp.zeros((2, 4, 8)), a, c)
