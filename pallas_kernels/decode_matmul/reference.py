"""float32 ``x @ w`` in pure JAX: what the CPU kernel (``cpu_kernel.cc``) computes, up to the
order of its float32 sums.

Shape letters: ``M`` rows of activations, ``K`` contracted, ``N`` outputs.
"""

import jax
import jax.numpy as jnp


def decode_matmul_reference(x_MK: jax.Array, w: jax.Array, *, w_layout: str = "KN") -> jax.Array:
    """``x @ w`` in float32 (``w`` is ``[K, N]``, or ``[N, K]`` with ``w_layout="NK"``: a tied
    head's table, contracted in place), at full float32 precision."""
    dims = (((1,), (0,)), ((), ())) if w_layout == "KN" else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(
        x_MK.astype(jnp.float32), w.astype(jnp.float32), dims,
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )
