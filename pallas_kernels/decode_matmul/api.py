"""``decode_matmul``: the AVX-512 kernel on CPUs that have it, the XLA reference elsewhere."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import unpartitioned
from pallas_kernels.decode_matmul.build import TARGET, register
from pallas_kernels.decode_matmul.reference import PANEL_COLS, decode_matmul_reference

IMPLEMENTATIONS = ("auto", "kernel", "xla")
LAYOUTS = ("KN", "NK", "panels")
"""Weight layouts, in the order of the kernel's ``w_layout`` attribute."""
MAX_ROWS = 16
"""Rows of ``x`` the kernel takes: decode steps (a slot a row). More rows are XLA's (the encoder,
prefill), where the products, not the weight bytes, bound the time."""


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (it is built on the first call)."""
    return register() is None


def kernel_applies(x_MK: jax.Array, w: jax.Array) -> bool:
    """Whether ``"auto"`` runs the kernel: float32 operands, at most :data:`MAX_ROWS` rows, a CPU
    backend whose CPU runs it, outside a partitioned mesh (``w`` a matrix or packed panels)."""
    shapes_ok = x_MK.ndim == 2 and w.ndim in (2, 3) and x_MK.shape[0] <= MAX_ROWS
    dtypes_ok = x_MK.dtype == jnp.float32 and w.dtype == jnp.float32
    on_cpu = jax.default_backend() == "cpu"
    return shapes_ok and dtypes_ok and on_cpu and unpartitioned() and kernel_available()


def decode_matmul(
    x_MK: jax.Array,
    w: jax.Array,
    *,
    w_layout: str = "KN",
    n: int | None = None,
    bias_N: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """:func:`~pallas_kernels.decode_matmul.reference.decode_matmul_reference` (float32
    ``[M, N]``) through the CPU kernel (``implementation="kernel"``: float32, at most 16 rows),
    XLA (``"xla"``), or the kernel where it applies (``"auto"``, :func:`kernel_applies`).
    ``w_layout="panels"``: ``w`` is :func:`~pallas_kernels.decode_matmul.reference.pack_panels`'s
    ``[ceil(N / 32), K, 32]``, and ``n`` gives ``N``. ``bias_N`` (float32 ``[N]``) is added to
    every row; the kernel adds it as it stores the sums."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if w_layout not in LAYOUTS:
        raise ValueError(f"w_layout must be one of {', '.join(LAYOUTS)}, not {w_layout!r}")
    if w_layout == "panels":
        P, K, cols = w.shape if w.ndim == 3 else (None, None, None)
        if n is None or cols != PANEL_COLS or P != -(-n // PANEL_COLS) or K != x_MK.shape[-1]:
            raise ValueError(
                f"packed panels {tuple(w.shape)} do not hold a [{x_MK.shape[-1]}, {n}] weight "
                f"(want [ceil(N / {PANEL_COLS}), K, {PANEL_COLS}] and n=N)"
            )
    elif n is not None and n != w.shape[1 if w_layout == "KN" else 0]:
        raise ValueError(
            f"n={n} but w {tuple(w.shape)} ({w_layout}) has {w.shape[1 if w_layout == 'KN' else 0]} columns"
        )
    N = n if w_layout == "panels" else w.shape[1 if w_layout == "KN" else 0]
    if bias_N is not None and (bias_N.shape != (N,) or bias_N.dtype != jnp.float32):
        got = f"{bias_N.dtype}{list(bias_N.shape)}"
        raise ValueError(f"bias_N must be float32 [{N}] (the product's columns), not {got}")
    if implementation == "auto":
        implementation = "kernel" if kernel_applies(x_MK, w) else "xla"
    if implementation == "xla":
        return decode_matmul_reference(x_MK, w, w_layout=w_layout, n=n, bias_N=bias_N)
    why = register()
    if why is not None:
        raise RuntimeError(f"the decode matmul CPU kernel cannot run: {why}")
    if x_MK.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise TypeError(f"the decode matmul CPU kernel takes float32 x and w, not {x_MK.dtype} and {w.dtype}")
    M = x_MK.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"the decode matmul CPU kernel takes at most {MAX_ROWS} rows, not {M}")
    bias = jnp.zeros((0,), jnp.float32) if bias_N is None else bias_N
    return _kernel(x_MK, w, bias, w_layout, N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel(x_MK: jax.Array, w: jax.Array, bias: jax.Array, w_layout: str, N: int) -> jax.Array:
    """The custom call; ``bias`` is ``[N]`` or empty (none)."""
    out = jax.ShapeDtypeStruct((x_MK.shape[0], N), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(x_MK, w, bias, w_layout=np.int64(LAYOUTS.index(w_layout)))


def _kernel_fwd(x_MK, w, bias, w_layout, N):
    return _kernel(x_MK, w, bias, w_layout, N), (x_MK, w, bias)


def _kernel_bwd(w_layout, N, residuals, dy_MN):
    # The reference's gradients (a custom call has no derivative): a LoRA step through a frozen
    # float32 layer at few rows lands here.
    x_MK, w, bias = residuals

    def reference(x, w, bias):
        bias_N = bias if bias.shape[0] else None
        return decode_matmul_reference(x, w, w_layout=w_layout, n=N, bias_N=bias_N)

    _, vjp = jax.vjp(reference, x_MK, w, bias)
    return vjp(dy_MN)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)
