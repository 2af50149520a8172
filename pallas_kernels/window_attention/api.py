"""``window_attention``: the AVX-512 kernel on CPUs that have it, the XLA reference elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import unpartitioned
from pallas_kernels.window_attention.build import TARGET, TARGET_BF16, register
from pallas_kernels.window_attention.reference import distance_bias_NK, window_attention_reference

IMPLEMENTATIONS = ("auto", "kernel", "xla")


def kernel_available() -> bool:
    """Whether the CPU kernel is built and registered (it is built on the first call)."""
    return register() is None


def kernel_applies(q_BNH: jax.Array, k_BNKH: jax.Array, v_BNKH: jax.Array) -> bool:
    """Whether the kernel runs these operands: a float32 ``q`` and float32 or bfloat16 ``k`` and
    ``v`` (of one dtype), on a CPU backend whose CPU runs it. (``"auto"`` also wants the trace
    unpartitioned: on a mesh, call it per head shard.)"""
    return jax.default_backend() == "cpu" and _dtypes_ok(q_BNH, k_BNKH, v_BNKH) and kernel_available()


def _dtypes_ok(q_BNH: jax.Array, k_BNKH: jax.Array, v_BNKH: jax.Array) -> bool:
    kv = {jnp.dtype(k_BNKH.dtype), jnp.dtype(v_BNKH.dtype)}
    return q_BNH.dtype == jnp.float32 and len(kv) == 1 and kv <= {jnp.dtype("float32"), jnp.dtype("bfloat16")}


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
    CPU kernel (``implementation="kernel"``: a float32 ``q``, float32 or bfloat16 ``k`` and ``v``,
    computed in float32), XLA (``"xla"``), or the kernel where
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
    if not _dtypes_ok(q_BNH, k_BNKH, v_BNKH):
        got = ", ".join(str(a.dtype) for a in (q_BNH, k_BNKH, v_BNKH))
        raise TypeError(
            f"the window attention CPU kernel takes a float32 q and float32 or bfloat16 k and v, not {got}"
        )
    N, K = k_BNKH.shape[1], k_BNKH.shape[2]
    bias_NK = (
        jnp.zeros((N, 0), jnp.float32) if bias_NR is None
        else distance_bias_NK(bias_NR, K, max_distance=max_distance)
    )
    target = TARGET
    if k_BNKH.dtype == jnp.bfloat16:  # the kernel reads the bits
        target = TARGET_BF16
        k_BNKH = jax.lax.bitcast_convert_type(k_BNKH, jnp.uint16)
        v_BNKH = jax.lax.bitcast_convert_type(v_BNKH, jnp.uint16)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32), vmap_method="sequential")
    B = q_BNH.shape[0]
    source_B = jnp.arange(B, dtype=jnp.int32) if source_B is None else source_B.astype(jnp.int32)
    lengths_B = lengths_B.astype(jnp.int32)
    return call(q_BNH, k_BNKH, v_BNKH, lengths_B, source_B, bias_NK, scale=np.float32(scale))
