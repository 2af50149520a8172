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
    k_NBKH: jax.Array,
    v_NBKH: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float = 1.0,
    bias_NR: jax.Array | None = None,
    max_distance: int = 128,
    stale_v: bool = True,
) -> jax.Array:
    """Decode attention of each slot over the first ``lengths[b]`` of its dense keys.

    ``stale_v=False`` promises that values past each length are finite (zeros, say), which
    saves masking them: 0 * NaN would otherwise be NaN.
    """
    K = k_NBKH.shape[2]
    valid_BK = jnp.arange(K, dtype=jnp.int32)[None, :] < lengths_B[:, None]

    # Heads lead every operand (N, B, ...), matching the gathered pages: XLA then runs batched
    # matrix-vector products without transposing the gathered K/V (a full copy per layer on CPU).
    q_NBH = jnp.transpose(q_BNH, (1, 0, 2))
    logits_NBK = jnp.float32(scale) * jnp.einsum(
        "NBH,NBKH->NBK", q_NBH, k_NBKH, precision=_HIGHEST, preferred_element_type=jnp.float32
    )
    if bias_NR is not None:
        bias_BNK = relative_bias_BNK(bias_NR, lengths_B, K, max_distance=max_distance)
        logits_NBK = logits_NBK + jnp.transpose(bias_BNK, (1, 0, 2))
    valid_1BK = valid_BK[None]
    logits_NBK = jnp.where(valid_1BK, logits_NBK, MASK_VALUE)

    max_NB1 = jnp.max(logits_NBK, axis=-1, keepdims=True)
    p_NBK = jnp.where(valid_1BK, jnp.exp(logits_NBK - max_NB1), 0.0)
    denom_NB1 = jnp.sum(p_NBK, axis=-1, keepdims=True)
    if stale_v:  # stale rows past a slot's length may hold anything, NaN included
        v_NBKH = jnp.where(valid_BK[None, :, :, None], v_NBKH, jnp.zeros((), v_NBKH.dtype))
    out_NBH = jnp.einsum(
        "NBK,NBKH->NBH",
        p_NBK,
        v_NBKH.astype(jnp.float32),
        precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )
    out_BNH = jnp.transpose(out_NBH / jnp.where(denom_NB1 > 0, denom_NB1, 1.0), (1, 0, 2))
    return out_BNH.astype(q_BNH.dtype)
