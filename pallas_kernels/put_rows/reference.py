"""Pure-JAX row writes: what the CPU kernel (``cpu_kernel.cc``) does in place.

Shape letters: ``A`` and ``C`` the two indexed axes of the destination (slots and window rows;
layers and a pool's page rows, ``C`` its pages and their rows flattened), ``N`` heads, ``H``
head width, ``B`` rows written.
"""

import math

import jax
import jax.numpy as jnp


def put_rows_reference(dst_ANCH: jax.Array, rows_BNH: jax.Array, a_B: jax.Array, c_B: jax.Array) -> jax.Array:
    """``dst[a[b], :, c[b], :] = rows[b]`` for each ``b`` whose ``(a, c)`` lies in ``dst``; the
    others are dropped (negative indices too: they do not count from the end). ``dst`` is
    ``[A, N, C..., H]``: ``c`` indexes its middle axes flattened in row-major order."""
    A, N, *middle, H = dst_ANCH.shape
    C = math.prod(middle)
    inside_B = (a_B >= 0) & (a_B < A) & (c_B >= 0) & (c_B < C)
    a_B = jnp.where(inside_B, a_B, A).astype(jnp.int32)  # out of range: dropped
    c_MB = jnp.unravel_index(jnp.where(inside_B, c_B, 0).astype(jnp.int32), middle)
    indices_BI = jnp.stack([a_B, *c_MB], axis=-1)
    index_dims = (0, *range(2, 2 + len(middle)))
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2), inserted_window_dims=index_dims, scatter_dims_to_operand_dims=index_dims
    )
    return jax.lax.scatter(
        dst_ANCH, indices_BI, rows_BNH.astype(dst_ANCH.dtype), dnums, unique_indices=True,
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )
