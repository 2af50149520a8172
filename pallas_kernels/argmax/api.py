"""``argmax``: the last axis's first maximum, through the AVX-512 kernel on CPU where it runs
(float32), else ``jnp.argmax`` (its reference)."""

import jax
import jax.numpy as jnp

from pallas_kernels.argmax.build import TARGET, TARGET_NORMALIZER, register
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
    if _choose(x, implementation) == "xla":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    rows = _kernel_rows(x)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32), vmap_method="sequential")
    return call(rows).reshape(x.shape[:-1])


def _choose(x: jax.Array, implementation: str) -> str:
    """``"kernel"`` or ``"xla"``: ``"auto"`` is the kernel for float32 on a CPU backend where it
    runs, outside a partitioned mesh."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        usable = x.dtype == jnp.float32 and x.ndim > 0 and x.shape[-1] > 0 and jax.default_backend() == "cpu"
        implementation = "kernel" if usable and unpartitioned() and kernel_available() else "xla"
    return implementation


def _kernel_rows(x: jax.Array) -> jax.Array:
    """``x`` as the kernel's ``[rows, V]``, once the kernel is registered and ``x`` fits it."""
    why = register()
    if why is not None:
        raise RuntimeError(f"the argmax CPU kernel cannot run: {why}")
    if x.dtype != jnp.float32:
        raise TypeError(f"the argmax CPU kernel takes float32, not {x.dtype}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"argmax of an empty last axis (shape {x.shape})")
    return x.reshape(-1, x.shape[-1])


def argmax_normalizer(
    x: jax.Array, *, implementation: str = "auto"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(argmax, max, sum(exp(x - max)))`` over the last axis: :func:`argmax` and the softmax's
    normalizer, so ``log_softmax(x)[i] = (x[i] - max) - log(sum)`` as ``jax.nn.log_softmax``
    computes it (NaN where ``max`` is not finite, as there). The kernel (float32) reads each row
    once for all three; ``"xla"``: XLA's reductions."""
    if _choose(x, implementation) == "xla":
        top = jax.lax.stop_gradient(jnp.max(x, axis=-1))
        return argmax(x, implementation="xla"), top, jnp.sum(jnp.exp(x - top[..., None]), axis=-1)
    rows = _kernel_rows(x)
    R = rows.shape[0]
    out = (jax.ShapeDtypeStruct((R,), jnp.int32), jax.ShapeDtypeStruct((R,), jnp.float32),
           jax.ShapeDtypeStruct((R,), jnp.float32))
    index, top, sum_exp = jax.ffi.ffi_call(TARGET_NORMALIZER, out, vmap_method="sequential")(rows)
    lead = x.shape[:-1]
    return index.reshape(lead), top.reshape(lead), sum_exp.reshape(lead)
