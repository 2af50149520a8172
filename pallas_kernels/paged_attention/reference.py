"""Pure-JAX paged decode attention: gather the slot's pages, masked softmax in float32.

This is the ground truth for the Pallas kernel and the engine's path on CPU, so it is written
for XLA: one gather of the page table's pages per head, two einsums, no per-slot loops.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.t5_bias import relative_position_bucket

# Finite, so a row with no valid key never produces inf - inf.
MASK_VALUE = -1e30
# Full float32 products on GPU too (no TF32); these einsums are memory-bound matrix-vector work.
_HIGHEST = jax.lax.Precision.HIGHEST


def relative_bias_BNK(
    bias_NR: jax.Array, lengths_B: jax.Array, num_keys: int, *, max_distance: int
) -> jax.Array:
    """T5 decoder bias of every key position for a query at position ``lengths - 1``."""
    num_buckets = bias_NR.shape[1]
    relative_BK = jnp.arange(num_keys, dtype=jnp.int32)[None, :] - (lengths_B[:, None] - 1)
    bucket_BK = relative_position_bucket(
        relative_BK, bidirectional=False, num_buckets=num_buckets, max_distance=max_distance
    )
    bias_NBK = jnp.take(bias_NR.astype(jnp.float32), bucket_BK, axis=1)
    return jnp.transpose(bias_NBK, (1, 0, 2))


def paged_attention_reference(
    q_BNH: jax.Array,
    k_pages_NPGH: jax.Array,
    v_pages_NPGH: jax.Array,
    page_table_BM: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float = 1.0,
    bias_NR: jax.Array | None = None,
    max_distance: int = 128,
) -> jax.Array:
    """Attention of each slot's query over its ``lengths[b]`` paged keys; see ``api.paged_attention``."""
    N, _, G, H = k_pages_NPGH.shape
    B, M = page_table_BM.shape
    k_NBKH = k_pages_NPGH[:, page_table_BM].reshape(N, B, M * G, H)
    v_NBKH = v_pages_NPGH[:, page_table_BM].reshape(N, B, M * G, H)
    return attention_over_keys(
        q_BNH, k_NBKH, v_NBKH, lengths_B, scale=scale, bias_NR=bias_NR, max_distance=max_distance
    )


def attention_over_keys(
    q_BNH: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float = 1.0,
    bias_NR: jax.Array | None = None,
    max_distance: int = 128,
    stale_v: bool = True,
    slots_first: bool = False,
) -> jax.Array:
    """Decode attention of each slot over the first ``lengths[b]`` of its dense keys.

    ``k`` and ``v`` are ``[N, B, K, H]`` (gathered pages), or ``[B, N, K, H]`` with
    ``slots_first`` (a slot's rows contiguous: :mod:`encdec.cache.window_kv`). ``stale_v=False``
    promises that values past each length are finite (zeros, say), which saves masking them:
    0 * NaN would otherwise be NaN.
    """
    K = k.shape[2]
    valid_BK = jnp.arange(K, dtype=jnp.int32)[None, :] < lengths_B[:, None]
    # Every operand keeps the keys' own layout: XLA then runs batched matrix-vector products
    # without transposing K/V (a full copy per layer on CPU).
    keys, rows = ("BNKH", "BNK") if slots_first else ("NBKH", "NBK")
    queries = rows[:2] + "H"
    q = q_BNH if slots_first else jnp.transpose(q_BNH, (1, 0, 2))
    logits = jnp.float32(scale) * jnp.einsum(
        f"{queries},{keys}->{rows}", q, k, precision=_HIGHEST, preferred_element_type=jnp.float32
    )
    if bias_NR is not None:
        bias_BNK = relative_bias_BNK(bias_NR, lengths_B, K, max_distance=max_distance)
        logits = logits + (bias_BNK if slots_first else jnp.transpose(bias_BNK, (1, 0, 2)))
    valid = jnp.expand_dims(valid_BK, rows.index("N"))
    logits = jnp.where(valid, logits, MASK_VALUE)

    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(logits - top), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if stale_v:  # stale rows past a slot's length may hold anything, NaN included
        v = jnp.where(valid[..., None], v, jnp.zeros((), v.dtype))
    out = jnp.einsum(
        f"{rows},{keys}->{queries}", p, v.astype(jnp.float32), precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )
    out = out / jnp.where(denom > 0, denom, 1.0)
    out_BNH = out if slots_first else jnp.transpose(out, (1, 0, 2))
    return out_BNH.astype(q_BNH.dtype)
