"""``window_attention``: the AVX-512 kernel on CPUs that have it, the XLA reference elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import unpartitioned
from pallas_kernels.window_attention.build import TARGET, register
from pallas_kernels.window_attention.reference import distance_bias_NK, window_attention_reference

IMPLEMENTATIONS = ("auto", "kernel", "xla")


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (it is built on the first call)."""
    return register() is None


def kernel_applies(*arrays: jax.Array) -> bool:
    """Whether the kernel runs these operands: float32, on a CPU backend whose CPU runs it.
    (``"auto"`` also wants the trace unpartitioned: on a mesh, call it per head shard.)"""
    float32 = all(a.dtype == jnp.float32 for a in arrays)
    return jax.default_backend() == "cpu" and float32 and kernel_available()


def window_attention(
    q_BNH: jax.Array,
    k_BNKH: jax.Array,
    v_BNKH: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float = 1.0,
    bias_NR: jax.Array | None = None,
    max_distance: int = 128,
    source_B: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """:func:`~pallas_kernels.window_attention.reference.window_attention_reference` through the
    CPU kernel (``implementation="kernel"``, float32 only), XLA (``"xla"``), or the kernel where
    it applies outside a partitioned mesh (``"auto"``). The kernel reads only the first
    ``lengths[b]`` rows of each slot. ``source_B``: the slot whose rows slot ``b`` reads (default
    its own); slots that read the same rows with the same length are attended together, so
    each row is read once for all of them (the beams of a group)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = "kernel" if kernel_applies(q_BNH, k_BNKH, v_BNKH) and unpartitioned() else "xla"
    if implementation == "xla":
        return window_attention_reference(
            q_BNH, k_BNKH, v_BNKH, lengths_B, scale=scale, bias_NR=bias_NR, max_distance=max_distance,
            source_B=source_B,
        )
    why = register()
    if why is not None:
        raise RuntimeError(f"the window attention CPU kernel cannot run: {why}")
    dtypes = {a.dtype for a in (q_BNH, k_BNKH, v_BNKH)}
    if dtypes != {jnp.dtype(jnp.float32)}:
        got = sorted(map(str, dtypes))
        raise TypeError(f"the window attention CPU kernel takes float32 q, k and v, not {got}")
    N, K = k_BNKH.shape[1], k_BNKH.shape[2]
    bias_NK = (
        jnp.zeros((N, 0), jnp.float32) if bias_NR is None
        else distance_bias_NK(bias_NR, K, max_distance=max_distance)
    )
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32), vmap_method="sequential")
    B = q_BNH.shape[0]
    source_B = jnp.arange(B, dtype=jnp.int32) if source_B is None else source_B.astype(jnp.int32)
    lengths_B = lengths_B.astype(jnp.int32)
    return call(q_BNH, k_BNKH, v_BNKH, lengths_B, source_B, bias_NK, scale=np.float32(scale))
