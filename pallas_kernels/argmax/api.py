"""``argmax``: the last axis's first maximum, through the AVX-512 kernel on CPU where it runs
(float32), else ``jnp.argmax`` (its reference)."""

import jax
import jax.numpy as jnp

from pallas_kernels.argmax.build import TARGET, register
from pallas_kernels.cpu_build import unpartitioned

IMPLEMENTATIONS = ("auto", "kernel", "xla")


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (it is built on the first call)."""
    return register() is None


def argmax(x: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32 (NaN counts as the maximum, ties go to the first):
    through the CPU kernel (``"kernel"``, float32 only), XLA (``"xla"``), or the kernel for
    float32 on a CPU backend where it runs, outside a partitioned mesh (``"auto"``: a
    vocabulary split over devices keeps XLA's reduction)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        usable = x.dtype == jnp.float32 and x.shape[-1] > 0 and jax.default_backend() == "cpu"
        usable = usable and unpartitioned()
        implementation = "kernel" if usable and kernel_available() else "xla"
    if implementation == "xla":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    why = register()
    if why is not None:
        raise RuntimeError(f"the argmax CPU kernel cannot run: {why}")
    if x.dtype != jnp.float32:
        raise TypeError(f"the argmax CPU kernel takes float32, not {x.dtype}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"argmax of an empty last axis (shape {x.shape})")
    rows = x.reshape(-1, x.shape[-1])
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32), vmap_method="sequential")
    return call(rows).reshape(x.shape[:-1])
