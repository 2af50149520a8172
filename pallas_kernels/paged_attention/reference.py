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
    K = M * G
    k_NBKH = k_pages_NPGH[:, page_table_BM].reshape(N, B, K, H)
    v_NBKH = v_pages_NPGH[:, page_table_BM].reshape(N, B, K, H)
    valid_BK = jnp.arange(K, dtype=jnp.int32)[None, :] < lengths_B[:, None]

    logits_BNK = jnp.float32(scale) * jnp.einsum(
        "BNH,NBKH->BNK", q_BNH, k_NBKH, precision=_HIGHEST, preferred_element_type=jnp.float32
    )
    if bias_NR is not None:
        logits_BNK = logits_BNK + relative_bias_BNK(bias_NR, lengths_B, K, max_distance=max_distance)
    valid_B1K = valid_BK[:, None, :]
    logits_BNK = jnp.where(valid_B1K, logits_BNK, MASK_VALUE)

    max_BN1 = jnp.max(logits_BNK, axis=-1, keepdims=True)
    p_BNK = jnp.where(valid_B1K, jnp.exp(logits_BNK - max_BN1), 0.0)
    denom_BN1 = jnp.sum(p_BNK, axis=-1, keepdims=True)
    # Stale rows past a slot's length may hold anything, NaN included: 0 * NaN = NaN.
    v_NBKH = jnp.where(valid_BK[None, :, :, None], v_NBKH, jnp.zeros((), v_NBKH.dtype))
    out_BNH = jnp.einsum(
        "BNK,NBKH->BNH",
        p_BNK,
        v_NBKH.astype(jnp.float32),
        precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )
    out_BNH = out_BNH / jnp.where(denom_BN1 > 0, denom_BN1, 1.0)
    return out_BNH.astype(q_BNH.dtype)
