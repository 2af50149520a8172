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


def tiles_shape(K: int, N: int) -> tuple[int, int, int]:
    """The shape :func:`pack_tiles` gives a ``[K, N]`` weight."""
    return -(-N // 64), -(-K // 64), 4096


def pack_tiles(w_KN: jax.Array) -> jax.Array:
    """An int8 ``[K, N]`` weight in the kernel's ``tiles`` layout, ``[P, KB, 4096]``: ``P``
    panels of 64 columns, each holding its ``KB = ceil(K / 64)`` blocks of 64 rows contiguously
    (zero-padded), a block as 4 column groups x 16 row groups x 64 bytes. Byte ``4 * (4 * L + j)
    + t`` of column group ``i``, row group ``g`` holds ``w[64 * b + 4 * g + t, 64 * p + 16 * L +
    4 * i + j]``: the four consecutive ``k`` of one column that VPDPBUSD and AMX reduce over, in
    the lane order the kernel's stores put back. The same bytes, so the same memory, as ``w``."""
    K, N = w_KN.shape
    P, KB, _ = tiles_shape(K, N)
    w = jnp.pad(w_KN.astype(jnp.int8), ((0, 64 * KB - K), (0, 64 * P - N)))
    # [b, g, t, p, L, i, j] -> [p, b, i, g, L, j, t]
    w = w.reshape(KB, 16, 4, P, 4, 4, 4).transpose(3, 0, 5, 1, 4, 6, 2)
    return w.reshape(P, KB, 4096)


def unpack_tiles(tiles: jax.Array, K: int, N: int) -> jax.Array:
    """The int8 ``[K, N]`` weight that :func:`pack_tiles` packed."""
    P, KB, _ = tiles.shape
    w = tiles.reshape(P, KB, 4, 16, 4, 4, 4).transpose(1, 3, 6, 0, 4, 2, 5)
    return w.reshape(64 * KB, 64 * P)[:K, :N]


def int8_matmul_reference(
    x_MK: jax.Array,
    w: jax.Array,
    scale_N: jax.Array,
    bias_N: jax.Array | None = None,
    *,
    w_layout: str = "KN",
) -> jax.Array:
    """``quantize(x) @ w * scale (+ bias)`` as float32 ``[M, N]``; ``w`` is int8 ``[K, N]``,
    ``[N, K]`` with ``w_layout="NK"`` (a tied head's embedding table, contracted in place), or
    :func:`pack_tiles`'s layout with ``w_layout="tiles"``."""
    if w_layout == "tiles":
        w, w_layout = unpack_tiles(w, x_MK.shape[1], scale_N.shape[0]), "KN"
    dims = (((1,), (0,)), ((), ())) if w_layout == "KN" else (((1,), (1,)), ((), ()))
    q_MK, xs_M1 = quantize_rows(x_MK)
    acc_MN = jax.lax.dot_general(q_MK, w, dims, preferred_element_type=jnp.int32)
    y_MN = acc_MN.astype(jnp.float32) * xs_M1 * scale_N[None].astype(jnp.float32)
    # The kernel rounds the product, then adds the bias; XLA may fuse the two (one rounding fewer).
    return y_MN if bias_N is None else y_MN + bias_N[None].astype(jnp.float32)
