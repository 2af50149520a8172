"""The float32 decode matmul kernel against its pure-JAX reference: row tiles, column tails,
every layout (packed panels too), the threaded split and its prefetched narrow rows; gradients
through it; and that the model's float32 projections reach it at decode rows only, packed panels
included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encdec.models.layers import project
from pallas_kernels.decode_matmul import (
    build,
    decode_matmul,
    decode_matmul_reference,
    kernel_available,
    pack_panels,
    unpack_panels,
)

needs_kernel = pytest.mark.skipif(
    bool(build.cpu_missing()), reason=f"this CPU lacks {', '.join(build.cpu_missing())}"
)


def _operands(M, K, N, layout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K), np.float32)
    w = rng.standard_normal((N, K) if layout == "NK" else (K, N), np.float32)
    return jnp.asarray(x), jnp.asarray(w)


@needs_kernel
def test_the_kernel_builds_where_the_cpu_has_avx512():
    assert build.register() is None
    assert kernel_available()


@needs_kernel
@pytest.mark.parametrize("layout", ["KN", "NK", "panels"])
@pytest.mark.parametrize(
    "M, K, N",
    [
        (1, 1, 1),
        (3, 7, 5),  # below one vector both ways
        (8, 100, 70),  # the engine's 8 slots; a column tail past two vectors, a partial block
        (5, 512, 512),  # threaded (1 MB), prefetched narrow rows
        (16, 768, 3072),  # every row the kernel takes: two row tiles; wide rows, not prefetched
        (9, 2048, 200),  # row tiles 4 + 5; ranges of 64 blocks
        (2, 64, 4100),  # panels: a last panel of 4 columns, chunks of several panels
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_equals_the_reference(layout, M, K, N, with_bias):
    x, w = _operands(M, K, N, layout, seed=M * 100 + N)
    packed = pack_panels(w) if layout == "panels" else w
    n = N if layout == "panels" else None
    bias = jnp.asarray(np.random.default_rng(N).standard_normal(N, np.float32)) if with_bias else None
    fn = jax.jit(
        lambda x, w, b, impl: decode_matmul(x, w, w_layout=layout, n=n, bias_N=b, implementation=impl),
        static_argnums=3,
    )
    got, want = np.asarray(fn(x, packed, bias, "kernel")), np.asarray(fn(x, packed, bias, "xla"))
    product = np.asarray(decode_matmul_reference(x, w, w_layout="NK" if layout == "NK" else "KN"))
    np.testing.assert_array_equal(product + (np.asarray(bias) if with_bias else 0), want)
    # float32 sums in another order: within a few ulps of the sum's magnitude.
    scale = np.abs(np.asarray(x)) @ np.abs(np.asarray(w.T if layout == "NK" else w))
    scale = scale + (np.abs(np.asarray(bias)) if with_bias else 0)
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-6)


@needs_kernel
def test_gradients_are_the_references():
    """A LoRA step through a frozen float32 layer at few rows differentiates through the kernel."""
    x, w = _operands(4, 64, 48, "KN", seed=3)
    bias = jnp.linspace(-1, 1, 48, dtype=jnp.float32)

    def loss(x, w, bias, impl):
        return jnp.sum(jnp.tanh(decode_matmul(x, w, bias_N=bias, implementation=impl)))

    got = jax.grad(loss, argnums=(0, 1, 2))(x, w, bias, "kernel")
    want = jax.grad(loss, argnums=(0, 1, 2))(x, w, bias, "xla")
    assert np.abs(np.asarray(want[2])).sum() > 0
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_float32_projections_call_the_kernel_at_decode_rows_only():
    rng = np.random.default_rng(4)
    p = {"w": jnp.asarray(rng.standard_normal((64, 32), np.float32))}

    def hlo(rows):
        x = jnp.zeros((rows, 1, 64), jnp.float32)
        return jax.jit(lambda x: project(p, x, "BSF,FD->BSD")).lower(x).as_text()

    assert build.TARGET in hlo(8)
    assert build.TARGET not in hlo(17)  # the encoder's rows: XLA's dot


@needs_kernel
@pytest.mark.parametrize(
    "eq, w_shape, x_dims",
    [
        ("BTD,VD->BTV", (70, 64), (64,)),
        ("BTD,DNH->BTNH", (48, 2, 12), (48,)),
        ("BTNH,NHD->BTD", (2, 24, 40), (2, 24)),
    ],
)
def test_a_projection_reads_its_packed_panels_at_decode_rows_and_its_w_beyond(eq, w_shape, x_dims):
    """A tied head's table (contracted last) and a decoder's projections (contracted first), with
    panels beside ``w``: decode rows read the panels, more rows ``w``."""
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
    w_KN = w.T if eq == "BTD,VD->BTV" else w.reshape(int(np.prod(x_dims)), -1)
    kept = w_shape[:1] if eq == "BTD,VD->BTV" else w_shape[len(x_dims):]
    b = jnp.asarray(rng.standard_normal(kept, np.float32))  # the kernel adds it as it stores
    p = {"w": w, "w_panels": pack_panels(w_KN), "b": b}
    decoy = {**p, "w_panels": jnp.zeros_like(p["w_panels"])}  # which weight was read?
    for rows, panels_read in ((8, True), (17, False)):
        x = jnp.asarray(rng.standard_normal((rows, 1, *x_dims), np.float32))
        want = np.einsum(eq, np.asarray(x), np.asarray(w)) + np.asarray(b)
        np.testing.assert_allclose(np.asarray(project(p, x, eq)), want, rtol=1e-5, atol=1e-4)
        bias_only = np.allclose(np.asarray(project(decoy, x, eq)), np.broadcast_to(np.asarray(b), want.shape))
        assert bias_only == panels_read


def test_packed_panels_round_trip():
    w = jnp.asarray(np.arange(5 * 70, dtype=np.float32).reshape(5, 70))
    panels = pack_panels(w)
    assert panels.shape == (3, 5, 32)
    np.testing.assert_array_equal(np.asarray(unpack_panels(panels, 70)), np.asarray(w))
    assert not np.asarray(panels)[2, :, 6:].any()  # the last panel's padding


def test_bad_arguments_are_refused():
    x, w = _operands(2, 8, 4, "KN", seed=5)
    with pytest.raises(ValueError, match="unknown implementation 'pallas'"):
        decode_matmul(x, w, implementation="pallas")
    with pytest.raises(ValueError, match="w_layout"):
        decode_matmul(x, w, w_layout="MN")
    with pytest.raises(ValueError, match="do not hold a"):
        decode_matmul(x, pack_panels(w), w_layout="panels")  # no n
    with pytest.raises(ValueError, match="do not hold a"):
        decode_matmul(x, pack_panels(w), w_layout="panels", n=40)
    with pytest.raises(ValueError, match="n=5"):
        decode_matmul(x, w, n=5)
    with pytest.raises(ValueError, match=r"bias_N must be float32 \[4\]"):
        decode_matmul(x, w, bias_N=jnp.zeros((5,), jnp.float32))
    if kernel_available():
        with pytest.raises(TypeError, match="float32"):
            decode_matmul(x.astype(jnp.bfloat16), w, implementation="kernel")
        with pytest.raises(ValueError, match="at most 16 rows"):
            decode_matmul(jnp.zeros((17, 8), jnp.float32), w, implementation="kernel")
    np.testing.assert_allclose(
        np.asarray(decode_matmul_reference(x, w)), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-6
    )
