"""Dense (non-paged) attention and the T5 relative-position bias.

The paged decode path lives in ``pallas_kernels.paged_attention``; this module serves the
encoder, teacher-forced decoding and the reference generator.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.t5_bias import relative_position_bucket

BLOCKED_MIN_SCORES = 128 * 1024
"""Query x key positions from which attention on CPU runs head by head in query blocks."""
QUERY_BLOCK = 256


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BNKH: jax.Array,
    v_BNKH: jax.Array,
    *,
    scale: float,
    mask_BTK: jax.Array,
    bias_BNTK: jax.Array | None = None,
    blocked: bool | None = None,
) -> jax.Array:
    """Softmax attention in float32 over head-major keys; rows with no valid key return zeros.

    Keys and values come heads-first (``[B, N, K, H]``), the layout in which XLA runs both
    einsums without transposing them.

    ``blocked`` (None: on CPU for ``T * K >= BLOCKED_MIN_SCORES``) computes one head at a time in
    blocks of ``QUERY_BLOCK`` queries, so each block's scores stay in cache between the two
    matmuls and the softmax; the whole ``[B, N, T, K]`` score tensor of a long input (a Whisper
    window: 1,500 x 1,500 per head) otherwise goes through memory several times. Measured on
    Whisper-base's encoder on 2 CPU cores: 15% less time per window, outputs equal to float32 rounding.
    """
    T, K = q_BTNH.shape[1], k_BNKH.shape[2]
    if blocked is None:
        blocked = jax.default_backend() == "cpu" and T * K >= BLOCKED_MIN_SCORES
    if blocked:
        return _blocked_attention(q_BTNH, k_BNKH, v_BNKH, scale, mask_BTK, bias_BNTK)
    q_BNTH = jnp.swapaxes(q_BTNH, 1, 2)
    logits_BNTK = jnp.einsum(
        "BNTH,BNKH->BNTK", q_BNTH, k_BNKH, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    if bias_BNTK is not None:
        logits_BNTK = logits_BNTK + bias_BNTK.astype(jnp.float32)
    p_BNTK = _softmax(logits_BNTK, mask_BTK[:, None])
    out_BTNH = jnp.einsum(
        "BNTK,BNKH->BTNH", p_BNTK.astype(v_BNKH.dtype), v_BNKH, preferred_element_type=jnp.float32
    )
    return out_BTNH.astype(q_BTNH.dtype)


def _softmax(logits_xK: jax.Array, mask_xK: jax.Array) -> jax.Array:
    """Softmax over the last axis where ``mask``; a row with no valid key is all zeros."""
    logits_xK = jnp.where(mask_xK, logits_xK, -jnp.inf)
    max_x1 = jnp.max(logits_xK, axis=-1, keepdims=True)
    max_x1 = jnp.where(jnp.isfinite(max_x1), max_x1, 0.0)
    p_xK = jnp.where(mask_xK, jnp.exp(logits_xK - max_x1), 0.0)
    denom_x1 = jnp.sum(p_xK, axis=-1, keepdims=True)
    return p_xK / jnp.where(denom_x1 > 0, denom_x1, 1.0)


def _blocked_attention(q_BTNH, k_BNKH, v_BNKH, scale, mask_BTK, bias_BNTK):
    """:func:`dot_product_attention` one (batch, head) at a time, queries in blocks (``C`` blocks
    of ``Q`` queries, the last padded)."""
    B, T, N, H = q_BTNH.shape
    K = k_BNKH.shape[2]
    Q = min(QUERY_BLOCK, T)
    C = -(-T // Q)
    pad = C * Q - T
    q_BNTH = jnp.pad(jnp.swapaxes(q_BTNH, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
    mask_BTK = jnp.pad(mask_BTK, ((0, 0), (0, pad), (0, 0)))
    bias = None
    if bias_BNTK is not None:
        bias = jnp.pad(jnp.broadcast_to(bias_BNTK, (B, N, T, K)), ((0, 0), (0, 0), (0, pad), (0, 0)))

    def head(z):
        b, n = z // N, z % N
        q_CQH = q_BNTH[b, n].reshape(C, Q, H)
        logits_CQK = jnp.einsum("CQH,KH->CQK", q_CQH, k_BNKH[b, n], preferred_element_type=jnp.float32)
        logits_CQK = logits_CQK * jnp.float32(scale)
        if bias is not None:
            logits_CQK = logits_CQK + bias[b, n].reshape(C, Q, K).astype(jnp.float32)
        p_CQK = _softmax(logits_CQK, mask_BTK[b].reshape(C, Q, K))
        v_KH = v_BNKH[b, n]
        out_CQH = jnp.einsum(
            "CQK,KH->CQH", p_CQK.astype(v_KH.dtype), v_KH, preferred_element_type=jnp.float32
        )
        return out_CQH.reshape(C * Q, H)[:T]

    out_ZTH = jax.lax.map(head, jnp.arange(B * N))
    return jnp.swapaxes(out_ZTH.reshape(B, N, T, H), 1, 2).astype(q_BTNH.dtype)


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
