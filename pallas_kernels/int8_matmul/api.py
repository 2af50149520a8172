"""``int8_matmul``: the AVX-512 VNNI kernel on CPUs that have it, the XLA reference elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_matmul.build import TARGET, register
from pallas_kernels.int8_matmul.reference import int8_matmul_reference

IMPLEMENTATIONS = ("auto", "kernel", "xla")


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (it is built on the first call)."""
    return register() is None


def int8_matmul(
    x_MK: jax.Array, w: jax.Array, scale_N: jax.Array, *, w_layout: str = "KN", implementation: str = "auto"
) -> jax.Array:
    """:func:`~pallas_kernels.int8_matmul.reference.int8_matmul_reference` (float32 ``[M, N]``),
    through the CPU kernel (``implementation="kernel"``), XLA (``"xla"``), or the kernel when the
    default backend is CPU and the kernel runs here (``"auto"``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if w_layout not in ("KN", "NK"):
        raise ValueError(f"w_layout must be 'KN' or 'NK', not {w_layout!r}")
    if implementation == "auto":
        implementation = "kernel" if jax.default_backend() == "cpu" and kernel_available() else "xla"
    if implementation == "xla":
        return int8_matmul_reference(x_MK, w, scale_N, w_layout=w_layout)
    why = register()
    if why is not None:
        raise RuntimeError(f"the int8 CPU kernel cannot run: {why}")
    M, N = x_MK.shape[0], w.shape[1 if w_layout == "KN" else 0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, N), jnp.float32), vmap_method="sequential")
    nk_layout = np.int64(w_layout == "NK")
    x_MK, w, scale_N = x_MK.astype(jnp.float32), w.astype(jnp.int8), scale_N.astype(jnp.float32)
    return call(x_MK, w, scale_N, nk_layout=nk_layout)
