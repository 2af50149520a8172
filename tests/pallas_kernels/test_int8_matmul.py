"""The int8 CPU kernel against its pure-JAX reference (and so against XLA's int8 dot): every
tile remainder, both weight layouts, the threaded path, zero and saturating rows; its build's
errors; and that the model's int8 projections reach it."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encdec.models.layers import project
from encdec.models.quant import int8_matmul_reference as float64_reference
from encdec.models.quant import quantize_params
from pallas_kernels.int8_matmul import (
    build,
    int8_matmul,
    int8_matmul_reference,
    kernel_available,
    pack_tiles,
    unpack_tiles,
)

ROOT = Path(__file__).resolve().parents[2]
needs_kernel = pytest.mark.skipif(
    bool(build.cpu_missing()), reason=f"this CPU lacks {', '.join(build.cpu_missing())}"
)


def _operands(M, K, N, layout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K), np.float32) * rng.uniform(0.1, 10.0, (M, 1)).astype(np.float32)
    w = rng.integers(-127, 128, (N, K) if layout == "NK" else (K, N)).astype(np.int8)
    s = rng.uniform(1e-3, 2e-2, N).astype(np.float32)
    return x, w, s


def _as_layout(w, layout):
    """The weight as the kernel reads it: tiles are a KN weight packed at load."""
    return pack_tiles(jnp.asarray(w)) if layout == "tiles" else w


@needs_kernel
def test_the_kernel_builds_where_the_cpu_has_vnni():
    # A CPU with the instructions must get the kernel: a broken build fails here, not silently
    # falling back to XLA's dot.
    assert build.register() is None
    assert kernel_available()


@needs_kernel
@pytest.mark.parametrize("layout", ["KN", "NK", "tiles"])
@pytest.mark.parametrize(
    "M, K, N",
    [
        (1, 64, 64),  # one tile, no remainder
        (3, 70, 9),  # K not a multiple of 4 (KN) or 64 (NK); N below one panel / group
        (5, 130, 131),  # row tiles 3 + 2; a column tail in both layouts
        (8, 512, 200),  # the engine's 8 slots: KN row tiles 4 + 4; tiles: one 8-row tile, two passes
        (13, 96, 66),  # more rows than any tile (tiles: 6 + 7 rows)
        (4, 512, 1100),  # >= 512 KB of weights: the threaded split
        (16, 1000, 4200),  # decode rows at most: row ranges, a partial block, column chunks of 4096
        (2, 196, 64),  # a block of 64 rows and a partial one (KN: the stream, 3 row groups past K)
        (17, 256, 80),  # one row past the stream: column panels
        (300, 512, 70),  # the encoder's many rows: packed panels, rows quantized by several threads
        (33, 128, 640),  # tiles: three row tiles (11 rows each) over column chunks
    ],
)
def test_kernel_equals_the_reference(layout, M, K, N):
    x, w, s = _operands(M, K, N, layout, seed=M * 1000 + N)
    fn = jax.jit(
        lambda x, w, s, impl: int8_matmul(x, w, s, w_layout=layout, implementation=impl), static_argnums=3
    )
    w_in = _as_layout(w, layout)
    got = np.asarray(fn(x, w_in, s, "kernel"))
    want = np.asarray(fn(x, w_in, s, "xla"))
    # Same int32 sums and the same float products: at most a rounding step apart.
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    w_KN = w.T if layout == "NK" else w
    np.testing.assert_allclose(got, float64_reference(x, w_KN, s, "kernel"), rtol=1e-4, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("layout", ["KN", "NK", "tiles"])
@pytest.mark.parametrize("M, K, N", [(8, 512, 200), (16, 1000, 4200), (300, 512, 70), (3, 70, 9)])
def test_the_kernel_adds_the_bias_as_it_stores(layout, M, K, N):
    """Every store path (decode stream, column panels, NK tiles, AMX and VPDPBUSD tiles) adds
    ``bias[n]`` once, to the rounded product: the bits of an add after the call (a fused
    multiply-add gave one-ulp differences, which flip later rows' int8 roundings)."""
    x, w, s = _operands(M, K, N, layout, seed=M + K + N)
    bias = jnp.asarray(np.random.default_rng(N).standard_normal(N).astype(np.float32))
    w_in = _as_layout(w, layout)
    fn = jax.jit(
        lambda x, w, s, b, impl: int8_matmul(x, w, s, b, w_layout=layout, implementation=impl),
        static_argnums=4,
    )
    got = np.asarray(fn(x, w_in, s, bias, "kernel"))
    # XLA may fuse its reference's multiply and add: a rounding step apart.
    np.testing.assert_allclose(got, np.asarray(fn(x, w_in, s, bias, "xla")), rtol=2e-6, atol=1e-4)
    plain = np.asarray(int8_matmul(x, w_in, s, w_layout=layout, implementation="kernel"))
    np.testing.assert_array_equal(got, plain + np.asarray(bias)[None])


@needs_kernel
@pytest.mark.parametrize("layout", ["KN", "NK", "tiles"])
def test_zero_and_saturating_rows(layout):
    x, w, s = _operands(6, 100, 70, layout, seed=1)
    x[0] = 0.0  # scale 1, all codes 0
    x[1] = 1e30  # every code +127
    x[2, :] = -3.0  # every code -127: the largest excess subtracted
    x[3, ::2] = 0.0
    w[...] = 127 if layout == "NK" else -128  # extreme weights: int32 sums near their bound
    w = _as_layout(w, layout)
    got = np.asarray(int8_matmul(jnp.asarray(x), w, s, w_layout=layout, implementation="kernel"))
    want = np.asarray(int8_matmul_reference(jnp.asarray(x), w, s, w_layout=layout))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert not got[0].any()


@needs_kernel
def test_the_vpdpbusd_stream_equals_the_reference_where_amx_is_off(tmp_path):
    """``ENCDEC_INT8_AMX=0`` keeps decode rows on VPDPBUSD: the path of CPUs without AMX, which
    an AMX machine would otherwise never run. A fresh process, since the choice is made once."""
    script = tmp_path / "check.py"
    script.write_text(
        "import numpy as np, jax.numpy as jnp\n"
        "from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference, pack_tiles, uses_amx\n"
        "assert not uses_amx()  # what the bench records as the kernel's choice\n"
        "rng = np.random.default_rng(0)\n"
        "for M, K, N in [(1, 64, 64), (8, 512, 2048), (16, 1000, 4200), (5, 70, 9), (40, 130, 200)]:\n"
        "    x = jnp.asarray(rng.standard_normal((M, K), np.float32))\n"
        "    w = jnp.asarray(rng.integers(-128, 128, (K, N)).astype(np.int8))\n"
        "    s = jnp.asarray(rng.uniform(1e-3, 2e-2, N).astype(np.float32))\n"
        "    want = np.asarray(int8_matmul_reference(x, w, s))\n"
        "    b = jnp.asarray(rng.standard_normal(N, np.float32))\n"
        "    for w_in, layout in [(w, 'KN'), (pack_tiles(w), 'tiles')]:\n"
        "        got = np.asarray(int8_matmul(x, w_in, s, w_layout=layout, implementation='kernel'))\n"
        "        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)\n"
        "        got = np.asarray(int8_matmul(x, w_in, s, b, w_layout=layout, implementation='kernel'))\n"
        "        np.testing.assert_array_equal(got, want + np.asarray(b)[None])\n"
        "print('ok')\n"
    )
    env = {**os.environ, "ENCDEC_INT8_AMX": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_kernel
def test_no_rows_and_no_columns():
    x, w, s = _operands(0, 64, 16, "KN", seed=2)
    assert int8_matmul(jnp.asarray(x), w, s, implementation="kernel").shape == (0, 16)
    x, w, s = _operands(4, 64, 0, "NK", seed=2)
    assert int8_matmul(jnp.asarray(x), w, s, w_layout="NK", implementation="kernel").shape == (4, 0)


@needs_kernel
def test_int8_projections_call_the_kernel():
    """The model's one projection primitive lowers to the custom call on CPU (``auto``)."""
    rng = np.random.default_rng(3)
    p = quantize_params({"wo": {"w": rng.standard_normal((64, 32), np.float32)}})["wo"]
    x = jnp.asarray(rng.standard_normal((2, 5, 64), np.float32))
    hlo = jax.jit(lambda x: project(p, x, "BSF,FD->BSD")).lower(x).as_text()
    assert build.TARGET in hlo


def test_tiles_hold_each_weight_where_the_kernel_reads_it():
    """pack_tiles's documented byte placement (the kernel's lane order), and its inverse."""
    K, N = 130, 150
    w = np.random.default_rng(5).integers(-128, 128, (K, N)).astype(np.int8)
    tiles = np.asarray(pack_tiles(jnp.asarray(w)))
    assert tiles.shape == (3, 3, 4096)
    for k, n in [(0, 0), (5, 17), (64, 100), (129, 149), (77, 70)]:
        b, g, t = k // 64, k % 64 // 4, k % 4
        p, L, i, j = n // 64, n % 64 // 16, n % 16 // 4, n % 4
        assert tiles[p, b, 1024 * i + 64 * g + 4 * (4 * L + j) + t] == w[k, n]
    w_pad = np.asarray(unpack_tiles(jnp.asarray(tiles), 192, 192))
    assert not w_pad[K:].any() and not w_pad[:, N:].any()  # zeros past K and N
    np.testing.assert_array_equal(np.asarray(unpack_tiles(jnp.asarray(tiles), K, N)), w)


def test_bad_arguments_are_refused():
    x, w, s = _operands(2, 8, 4, "KN", seed=4)
    with pytest.raises(ValueError, match="unknown implementation 'pallas'"):
        int8_matmul(x, w, s, implementation="pallas")
    with pytest.raises(ValueError, match="w_layout"):
        int8_matmul(x, w, s, w_layout="MN")
    for impl in ("kernel", "xla"):
        with pytest.raises(ValueError, match=r"bias of shape \(3,\), expected \[4\]"):
            int8_matmul(x, w, s, jnp.zeros(3), implementation=impl)
    s100 = np.ones(100, np.float32)
    for impl in ("kernel", "xla"):
        with pytest.raises(ValueError, match=r"tiles of shape \(1, 1, 4096\) do not pack a \[8, 100\]"):
            int8_matmul(x, pack_tiles(jnp.asarray(w)), s100, w_layout="tiles", implementation=impl)


def test_a_failed_build_names_the_compiler_and_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCDEC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails without a word
    with pytest.raises(RuntimeError, match="building the int8_matmul kernel failed:\nfalse "):
        build.build()
    assert not list(tmp_path.iterdir())  # no half-written library left to load later
