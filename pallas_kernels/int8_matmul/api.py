"""``int8_matmul``: the AVX-512 VNNI kernel on CPUs that have it, the XLA reference elsewhere."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_matmul.build import TARGET, build, register
from pallas_kernels.int8_matmul.reference import int8_matmul_reference, tiles_shape

IMPLEMENTATIONS = ("auto", "kernel", "xla")
LAYOUTS = ("KN", "NK", "tiles")
"""``w``'s layouts: ``[K, N]``; ``[N, K]`` (a tied head's table); ``tiles``, a ``[K, N]`` weight
packed by :func:`~pallas_kernels.int8_matmul.reference.pack_tiles` (the fastest on CPU)."""


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (it is built on the first call)."""
    return register() is None


def uses_amx() -> bool:
    """Whether the CPU kernel multiplies decode rows with AMX tiles in this process (else with
    VPDPBUSD); False where the kernel does not run."""
    if not kernel_available():
        return False
    return bool(ctypes.cdll.LoadLibrary(str(build())).EncdecInt8UsesAmx())


def int8_matmul(
    x_MK: jax.Array,
    w: jax.Array,
    scale_N: jax.Array,
    bias_N: jax.Array | None = None,
    *,
    w_layout: str = "KN",
    implementation: str = "auto",
) -> jax.Array:
    """:func:`~pallas_kernels.int8_matmul.reference.int8_matmul_reference` (float32 ``[M, N]``,
    plus ``bias_N`` where given: the kernel adds it as it stores), through the CPU kernel
    (``implementation="kernel"``), XLA (``"xla"``), or the kernel when the default backend is CPU
    and the kernel runs here (``"auto"``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if w_layout not in LAYOUTS:
        raise ValueError(f"w_layout must be one of {', '.join(LAYOUTS)}, not {w_layout!r}")
    K, N = x_MK.shape[1], scale_N.shape[0]
    if w_layout == "tiles" and w.shape != tiles_shape(K, N):
        raise ValueError(f"tiles of shape {w.shape} do not pack a [{K}, {N}] weight")
    if bias_N is not None and bias_N.shape != (N,):
        raise ValueError(f"bias of shape {bias_N.shape}, expected [{N}] (one per output column)")
    if implementation == "auto":
        implementation = "kernel" if jax.default_backend() == "cpu" and kernel_available() else "xla"
    if implementation == "xla":
        return int8_matmul_reference(x_MK, w, scale_N, bias_N, w_layout=w_layout)
    why = register()
    if why is not None:
        raise RuntimeError(f"the int8 CPU kernel cannot run: {why}")
    out = jax.ShapeDtypeStruct((x_MK.shape[0], N), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    x_MK, w, scale_N = x_MK.astype(jnp.float32), w.astype(jnp.int8), scale_N.astype(jnp.float32)
    bias_N = jnp.zeros((0,), jnp.float32) if bias_N is None else bias_N.astype(jnp.float32)
    return call(x_MK, w, scale_N, bias_N, w_layout=np.int64(LAYOUTS.index(w_layout)))
