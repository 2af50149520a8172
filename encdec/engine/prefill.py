"""Decoder prefill: a request's forced prefix through the decoder in one pass at its encode step.

Without it, a slot feeds its forced prefix one token per decode step, and every slot of the
engine waits for those steps: Whisper's previous-text prompt (up to 224 tokens a window) made
long-form transcription spend more decode steps on prompts than on text. Here the encode step
runs the decoder over each request's prefix at once (dense causal self-attention, cross-attention
over the encoder output it just computed), writes the self K/V of positions ``0 ..
prefilled - 1`` into every slot of the request's group, and leaves the slot where the decode
steps would have: ``prefilled`` tokens stored, the next prefix token as its last token, the
history filled. The pass is as wide as the engine's longest own prefix (static), never the room
a resumed request's replayed tokens need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from encdec.cache.pools import write_layer_pages
from encdec.config import ModelConfig
from encdec.engine.slots import DecodeState, SlotParams
from encdec.models import decode
from encdec.models.kv import DenseKV


def prefill_prefix(
    params,
    state: DecodeState,
    cross_k_LbSNH: jax.Array,
    cross_v_LbSNH: jax.Array,
    rows: SlotParams,
    slot_bK: jax.Array,
    self_pages_bKM: jax.Array,
    *,
    width: int,
    cfg: ModelConfig,
    dtype,
    lora=None,
) -> DecodeState:
    """Store each row's first ``rows.prefilled`` (at most ``width``) prefix positions in its
    slots, started already. Rows with ``prefilled == 0`` (and padding rows, slot ``num_slots``)
    change nothing.
    """
    b, K = slot_bK.shape
    B = state.active_B.shape[0]
    P = rows.prefix_X.shape[1]  # the prefix with room for a resumed request's replayed tokens
    W = min(width, P)
    L, _, S, N, H = cross_k_LbSNH.shape  # N: this device's heads under tensor parallelism
    heads_dims = (N, W, H)
    kv = DenseKV(
        self_k_BNKH=tuple(jnp.zeros((b, *heads_dims), dtype) for _ in range(L)),
        self_v_BNKH=tuple(jnp.zeros((b, *heads_dims), dtype) for _ in range(L)),
        cross_k_BNSH=tuple(jnp.swapaxes(cross_k_LbSNH[i], 1, 2).astype(dtype) for i in range(L)),
        cross_v_BNSH=tuple(jnp.swapaxes(cross_v_LbSNH[i], 1, 2).astype(dtype) for i in range(L)),
        cross_mask_BS=jnp.arange(S)[None, :] < rows.cross_length[:, None],
        index=jnp.zeros((), jnp.int32),
    )
    positions_bW = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (b, W))
    _, kv = decode(params, cfg, rows.prefix_X[:, :W], positions_bW, kv, dtype=dtype, lora=lora)

    # Every slot of a group stores the same prefix in its own pages.
    slot_X = slot_bK.reshape(-1)
    n_X = jnp.where(slot_X < B, jnp.minimum(jnp.repeat(rows.prefilled, K), W), 0)
    pages_XM = self_pages_bKM.reshape(b * K, -1)

    def pages(per_layer):  # [L][b, N, W, H] -> [L, b*K, W, N, H]
        x_LbWNH = jnp.swapaxes(jnp.stack(per_layer), 2, 3)
        return jnp.repeat(x_LbWNH, K, axis=1).astype(state.pools.self_k_LNPGH.dtype)

    pools = state.pools.replace(
        self_k_LNPGH=write_layer_pages(state.pools.self_k_LNPGH, pages_XM, pages(kv.self_k_BNKH), n_X),
        self_v_LNPGH=write_layer_pages(state.pools.self_v_LNPGH, pages_XM, pages(kv.self_v_BNKH), n_X),
    )
    prefix_XP = jnp.repeat(rows.prefix_X, K, axis=0)
    last_X = jnp.take_along_axis(prefix_XP, jnp.minimum(n_X, P - 1)[:, None], axis=1)[:, 0]
    T = state.history_BT.shape[1]
    t_T = jnp.arange(T)
    prefix_XT = jnp.pad(prefix_XP, ((0, 0), (0, T - P)))
    history_XT = jnp.where(t_T[None, :] <= n_X[:, None], prefix_XT, -1)
    # Only rows that prefill change their slots; the others keep what start_slots wrote.
    target_X = jnp.where(n_X > 0, slot_X, B)

    def put(x, new):
        return x.at[target_X].set(new.astype(x.dtype), mode="drop")

    window = state.window
    if window is not None:
        window = window.write_self_rows(
            target_X,
            jnp.repeat(jnp.stack(kv.self_k_BNKH), K, axis=1),
            jnp.repeat(jnp.stack(kv.self_v_BNKH), K, axis=1),
        )
    return state.replace(
        window=window,
        pools=pools,
        self_lengths_B=put(state.self_lengths_B, n_X),
        last_token_B=put(state.last_token_B, last_X),
        history_BT=put(state.history_BT, history_XT),
    )
