"""The argmax CPU kernel against jnp.argmax: vector tails, ties (the first wins), -inf rows,
NaN (the first NaN wins), the threaded split, leading axes; its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.argmax import argmax, argmax_normalizer, build, kernel_available

needs_kernel = pytest.mark.skipif(
    bool(build.cpu_missing()), reason=f"this CPU lacks {', '.join(build.cpu_missing())}"
)


@needs_kernel
def test_the_kernel_builds_where_the_cpu_has_avx512():
    assert build.register() is None
    assert kernel_available()


def _cases():
    rng = np.random.default_rng(0)
    yield "random with tails", rng.standard_normal((5, 37), np.float32)
    yield "one column", rng.standard_normal((3, 1), np.float32)
    yield "threaded, a vocabulary", rng.standard_normal((8, 32128), np.float32)
    ties = rng.integers(0, 3, (6, 100)).astype(np.float32)  # many equal maxima per row
    yield "ties", ties
    banned = np.full((3, 50), -np.inf, np.float32)
    banned[1, 33] = -1e30
    banned[2, 17] = np.inf
    yield "-inf rows, one finite, +inf", banned
    nan = rng.standard_normal((4, 70), np.float32)
    nan[1, 40], nan[1, 60], nan[2, 0], nan[3, 69] = np.nan, np.nan, np.nan, np.nan
    nan[3, 5] = np.inf
    yield "NaN", nan
    yield "leading axes", rng.standard_normal((2, 3, 40), np.float32)
    # Rows of several 64-wide blocks, which the kernel scans as four interleaved lane sets: the
    # first maximum must win across sets, and a NaN or +inf inside a block must still be found.
    wide_ties = rng.integers(0, 2, (6, 333)).astype(np.float32)
    wide_ties[0, :] = 0.0
    wide_ties[0, [100, 70, 250]] = 1.0  # the first maximum sits in a later lane set than others
    yield "wide ties", wide_ties
    wide = rng.standard_normal((5, 300), np.float32)
    wide[0, 150], wide[0, 290], wide[1, 64] = np.nan, np.nan, np.nan
    wide[2, :] = -np.inf
    wide[2, 131] = -1e30
    wide[3, :] = -np.inf
    wide[4, 199], wide[4, 7] = np.inf, np.inf
    yield "wide NaN, -inf and +inf", wide


@needs_kernel
@pytest.mark.parametrize("name, x", list(_cases()), ids=[n for n, _ in _cases()])
def test_kernel_equals_jnp_argmax(name, x):
    got = jax.jit(lambda x: argmax(x, implementation="kernel"))(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=-1))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))


@needs_kernel
@pytest.mark.parametrize("name, x", list(_cases()), ids=[n for n, _ in _cases()])
def test_the_normalizer_gives_jax_log_softmax(name, x):
    """The chosen token's log-probability from the kernel's (argmax, max, sum exp) is
    jax.nn.log_softmax's, NaN rows and all -inf rows alike."""
    with np.errstate(invalid="ignore"):  # -inf - -inf: NaN, as in log_softmax
        _check_normalizer(x)


def _check_normalizer(x):
    index, top, sum_exp = jax.jit(lambda x: argmax_normalizer(x, implementation="kernel"))(x)
    want = np.asarray(jax.nn.log_softmax(jnp.asarray(x)))
    chosen = np.take_along_axis(x, np.asarray(index)[..., None], axis=-1)[..., 0]
    got = (chosen - np.asarray(top)) - np.log(np.asarray(sum_exp))
    want = np.take_along_axis(want, np.asarray(index)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # NaN where want is NaN
    # Any token's, not only the maximum's.
    rows = x.reshape(-1, x.shape[-1])
    lp = (rows[:, 0] - np.asarray(top).reshape(-1)) - np.log(np.asarray(sum_exp).reshape(-1))
    want0 = np.asarray(jax.nn.log_softmax(jnp.asarray(rows)))[:, 0]
    np.testing.assert_allclose(lp, want0, rtol=1e-5, atol=1e-5)
    xla = argmax_normalizer(jnp.asarray(x), implementation="xla")
    np.testing.assert_allclose(np.asarray(sum_exp), np.asarray(xla[2]), rtol=1e-5)


def test_bad_input_is_named():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="unknown implementation 'gpu'"):
        argmax(x, implementation="gpu")
    if kernel_available():
        with pytest.raises(TypeError, match="float32"):
            argmax(x.astype(np.int32), implementation="kernel")
        with pytest.raises(ValueError, match="empty last axis"):
            argmax(np.zeros((2, 0), np.float32), implementation="kernel")
    # bfloat16 logits take XLA's argmax under "auto".
    np.testing.assert_array_equal(argmax(jnp.asarray([[1.0, 3.0, 2.0]], jnp.bfloat16)), [1])
