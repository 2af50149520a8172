"""float32 ``x @ w`` in pure JAX: what the CPU kernel (``cpu_kernel.cc``) computes, up to the
order of its float32 sums.

Shape letters: ``M`` rows of activations, ``K`` contracted, ``N`` outputs.
"""

import jax
import jax.numpy as jnp

PANEL_COLS = 32
"""Columns of a :func:`pack_panels` panel: two AVX-512 vectors, a row tile's sums in registers."""


def pack_panels(w_KN: jax.Array) -> jax.Array:
    """A float32 ``[K, N]`` weight as ``[ceil(N / 32), K, 32]`` panels of 32 columns (the last
    zero-padded): each panel's rows for all of K contiguous, the order the kernel streams them."""
    K, N = w_KN.shape
    P = -(-N // PANEL_COLS)
    w = jnp.pad(w_KN.astype(jnp.float32), ((0, 0), (0, PANEL_COLS * P - N)))
    return w.reshape(K, P, PANEL_COLS).transpose(1, 0, 2)


def unpack_panels(panels: jax.Array, N: int) -> jax.Array:
    """The ``[K, N]`` weight that :func:`pack_panels` packed."""
    P, K, _ = panels.shape
    return panels.transpose(1, 0, 2).reshape(K, P * PANEL_COLS)[:, :N]


def decode_matmul_reference(
    x_MK: jax.Array,
    w: jax.Array,
    *,
    w_layout: str = "KN",
    n: int | None = None,
    bias_N: jax.Array | None = None,
) -> jax.Array:
    """``x @ w (+ bias_N)`` in float32 (``w`` is ``[K, N]``, ``[N, K]`` with ``w_layout="NK"``: a
    tied head's table, contracted in place, or :func:`pack_panels`'s with ``w_layout="panels"``
    and ``n = N``), at full float32 precision."""
    if w_layout == "panels":
        w, w_layout = unpack_panels(w, n), "KN"
    dims = (((1,), (0,)), ((), ())) if w_layout == "KN" else (((1,), (1,)), ((), ()))
    y_MN = jax.lax.dot_general(
        x_MK.astype(jnp.float32), w.astype(jnp.float32), dims,
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )
    return y_MN if bias_N is None else y_MN + bias_N.astype(jnp.float32)
