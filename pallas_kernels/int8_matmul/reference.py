"""int8 x int8 -> int32 matmul with per-row dynamic activation quantization, in pure JAX.

The arithmetic the CPU kernel (``cpu_kernel.cc``) computes, and the XLA path where the kernel
does not run: ``x`` quantized per row (symmetric absmax, ``s = max|x| / 127``, round half to
even; computed with reciprocals, see :func:`quantize_rows`), an exact int32 dot against an int8
weight, then ``acc * s_row * scale_col`` in float32.

Shape letters: ``M`` rows of activations, ``K`` contracted, ``N`` outputs.
"""

import jax
import jax.numpy as jnp


def quantize_rows(x_MK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Activations as int8 with one absmax scale per row (``x ~ q * scale``).

    Written with reciprocals (``amax * (1/127)``, ``x * (1/scale)``), which is also what XLA:CPU
    made of the divisions: the kernel rounds exactly these values, ties included."""
    x32 = x_MK.astype(jnp.float32)
    amax_M1 = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale_M1 = jnp.where(amax_M1 > 0, amax_M1 * jnp.float32(1 / 127), 1.0)
    q_MK = jnp.clip(jnp.round(x32 * (1.0 / scale_M1)), -127, 127).astype(jnp.int8)
    return q_MK, scale_M1


def int8_matmul_reference(
    x_MK: jax.Array, w: jax.Array, scale_N: jax.Array, *, w_layout: str = "KN"
) -> jax.Array:
    """``quantize(x) @ w * scale`` as float32 ``[M, N]``; ``w`` is int8 ``[K, N]``, or ``[N, K]``
    with ``w_layout="NK"`` (a tied head's embedding table, contracted in place)."""
    dims = (((1,), (0,)), ((), ())) if w_layout == "KN" else (((1,), (1,)), ((), ()))
    q_MK, xs_M1 = quantize_rows(x_MK)
    acc_MN = jax.lax.dot_general(q_MK, w, dims, preferred_element_type=jnp.int32)
    return acc_MN.astype(jnp.float32) * xs_M1 * scale_N[None].astype(jnp.float32)
