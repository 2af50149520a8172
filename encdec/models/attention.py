"""Dense (non-paged) attention and the T5 relative-position bias.

The paged decode path lives in ``pallas_kernels.paged_attention``; this module serves the
encoder, teacher-forced decoding and the reference generator.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.t5_bias import relative_position_bucket


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BNKH: jax.Array,
    v_BNKH: jax.Array,
    *,
    scale: float,
    mask_BTK: jax.Array,
    bias_BNTK: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention in float32 over head-major keys; rows with no valid key return zeros.

    Keys and values come heads-first (``[B, N, K, H]``), the layout in which XLA runs both
    einsums without transposing them.
    """
    q_BNTH = jnp.swapaxes(q_BTNH, 1, 2)
    logits_BNTK = jnp.einsum(
        "BNTH,BNKH->BNTK", q_BNTH, k_BNKH, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    if bias_BNTK is not None:
        logits_BNTK = logits_BNTK + bias_BNTK.astype(jnp.float32)
    mask_B1TK = mask_BTK[:, None]
    logits_BNTK = jnp.where(mask_B1TK, logits_BNTK, -jnp.inf)
    max_BNT1 = jnp.max(logits_BNTK, axis=-1, keepdims=True)
    max_BNT1 = jnp.where(jnp.isfinite(max_BNT1), max_BNT1, 0.0)
    p_BNTK = jnp.where(mask_B1TK, jnp.exp(logits_BNTK - max_BNT1), 0.0)
    denom_BNT1 = jnp.sum(p_BNTK, axis=-1, keepdims=True)
    p_BNTK = p_BNTK / jnp.where(denom_BNT1 > 0, denom_BNT1, 1.0)
    out_BTNH = jnp.einsum(
        "BNTK,BNKH->BTNH", p_BNTK.astype(v_BNKH.dtype), v_BNKH, preferred_element_type=jnp.float32
    )
    return out_BTNH.astype(q_BTNH.dtype)


def relative_bias(
    bias_NR: jax.Array,
    q_pos_BT: jax.Array,
    k_pos_K: jax.Array,
    *,
    bidirectional: bool,
    max_distance: int,
) -> jax.Array:
    """T5 position bias ``[B, N, T, K]`` from a layer's bucket table."""
    rel_BTK = k_pos_K[None, None, :] - q_pos_BT[:, :, None]
    bucket_BTK = relative_position_bucket(
        rel_BTK, bidirectional=bidirectional, num_buckets=bias_NR.shape[1], max_distance=max_distance
    )
    return jnp.moveaxis(bias_NR[:, bucket_BTK], 0, 1)
