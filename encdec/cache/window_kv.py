"""``WindowKV``: paged storage, dense attention for the span of one decode dispatch (CPU path).

XLA has no paged attention: its reference gathers every layer's pages into a dense copy and
masks the stale rows on *every* step, and on CPU those two passes cost nearly as much as the
step's matrix products (t5-small, 8 slots, 2 cores: 13 against 16 thread-ms of a 27 ms step).
Within one dispatch the cross pages
never change and the self pages only gain one row per step, so ``open_window`` gathers and
masks each layer's pages once per dispatch and each step appends its new row to the dense
copy as well as to the pools. Attention then reads the dense copy in place. The pools stay
the store of record: the window is dropped when the dispatch ends.

The Pallas kernel reads pages directly, so the GPU path keeps :class:`PagedKV`; the window
is for XLA backends, where ``attention_impl="auto"`` picks it.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from encdec.cache.paged_kv import store_self_row
from encdec.cache.pools import PagePools
from encdec.models.kv import replace_at
from pallas_kernels.paged_attention.reference import attention_over_keys


@flax.struct.dataclass
class KVWindow:
    """Dense per-layer copies of every slot's pages, heads first (the pools' and einsums' layout)."""

    self_k_NBKH: tuple[jax.Array, ...]
    self_v_NBKH: tuple[jax.Array, ...]
    cross_k_NBSH: tuple[jax.Array, ...]
    cross_v_NBSH: tuple[jax.Array, ...]

    def take_self_rows(self, slot_B: jax.Array) -> KVWindow:
        """Slot ``b``'s self rows become slot ``slot_B[b]``'s (beams continuing another beam)."""
        return self.replace(
            self_k_NBKH=tuple(x[:, slot_B] for x in self.self_k_NBKH),
            self_v_NBKH=tuple(x[:, slot_B] for x in self.self_v_NBKH),
        )


def _gather_layer(pool_LNPGH: jax.Array, layer: int, page_table_BM: jax.Array, lengths_B: jax.Array):
    """Layer ``layer``'s pages of every slot as ``[N, B, M * G, H]``; rows past a slot's length are 0.

    Stale rows may hold anything (NaN included), and the value product would spread it.
    """
    _, N, _, G, H = pool_LNPGH.shape
    B, M = page_table_BM.shape
    x_NBKH = pool_LNPGH[layer][:, page_table_BM].reshape(N, B, M * G, H)
    valid_BK = jnp.arange(M * G, dtype=jnp.int32)[None, :] < lengths_B[:, None]
    return jnp.where(valid_BK[None, :, :, None], x_NBKH, jnp.zeros((), x_NBKH.dtype))


def open_window(
    pools: PagePools,
    self_page_table_BM: jax.Array,
    self_lengths_B: jax.Array,
    cross_page_table_BM: jax.Array,
    cross_lengths_B: jax.Array,
) -> KVWindow:
    """Gather every layer's self and cross pages once, for the steps of one dispatch."""
    L = pools.self_k_LNPGH.shape[0]

    def layers(pool, table, lengths):
        return tuple(_gather_layer(pool, layer, table, lengths) for layer in range(L))

    return KVWindow(
        self_k_NBKH=layers(pools.self_k_LNPGH, self_page_table_BM, self_lengths_B),
        self_v_NBKH=layers(pools.self_v_LNPGH, self_page_table_BM, self_lengths_B),
        cross_k_NBSH=layers(pools.cross_k_LNPGH, cross_page_table_BM, cross_lengths_B),
        cross_v_NBSH=layers(pools.cross_v_LNPGH, cross_page_table_BM, cross_lengths_B),
    )


@flax.struct.dataclass
class WindowKV:
    """Like :class:`~encdec.cache.paged_kv.PagedKV` (one token per step, per-slot positions), but
    attention reads ``window``; new rows go to both the window and the pools."""

    pools: PagePools
    window: KVWindow
    self_page_table_BM: jax.Array
    self_lengths_B: jax.Array
    """Tokens already stored per slot: the position of the token being decoded."""
    cross_lengths_B: jax.Array
    active_B: jax.Array

    def self_attention(self, layer, q_BTNH, k_BTNH, v_BTNH, positions_BT, *, scale, bias_NR, max_distance):
        """Store the new K/V row at ``self_lengths`` (pools and window); attend over ``self_lengths + 1``."""
        if k_BTNH.shape[1] != 1:
            raise ValueError(f"WindowKV decodes one token per step; got T={k_BTNH.shape[1]}")
        pools, writes_B = store_self_row(
            self.pools, layer, self.self_page_table_BM, self.self_lengths_B, self.active_B,
            k_BTNH[:, 0], v_BTNH[:, 0],
        )
        B, K = self.self_page_table_BM.shape[0], self.window.self_k_NBKH[layer].shape[2]
        pos_B = self.self_lengths_B.astype(jnp.int32)
        row_B = jnp.where(writes_B, pos_B, K)  # out of range: dropped
        slot_B = jnp.arange(B)

        def append(window_NBKH, new_BNH):
            new_NBH = jnp.swapaxes(new_BNH, 0, 1).astype(window_NBKH.dtype)
            return window_NBKH.at[:, slot_B, row_B, :].set(new_NBH, mode="drop")

        k_NBKH = append(self.window.self_k_NBKH[layer], k_BTNH[:, 0])
        v_NBKH = append(self.window.self_v_NBKH[layer], v_BTNH[:, 0])
        out_BNH = attention_over_keys(
            q_BTNH[:, 0], k_NBKH, v_NBKH, jnp.where(self.active_B, pos_B + 1, 0),
            scale=scale, bias_NR=bias_NR, max_distance=max_distance, stale_v=False,
        )
        window = self.window.replace(
            self_k_NBKH=replace_at(self.window.self_k_NBKH, layer, k_NBKH),
            self_v_NBKH=replace_at(self.window.self_v_NBKH, layer, v_NBKH),
        )
        return out_BNH[:, None], self.replace(pools=pools, window=window)

    def cross_attention(self, layer, q_BTNH, *, scale):
        """Attend over this layer's encoder positions (``cross_lengths``; none for inactive slots)."""
        lengths_B = jnp.where(self.active_B, self.cross_lengths_B.astype(jnp.int32), 0)
        out_BNH = attention_over_keys(
            q_BTNH[:, 0], self.window.cross_k_NBSH[layer], self.window.cross_v_NBSH[layer], lengths_B,
            scale=scale, stale_v=False,
        )
        return out_BNH[:, None]

    def advance(self, num_tokens):
        if num_tokens != 1:
            raise ValueError(f"WindowKV decodes one token per step; got {num_tokens}")
        step_B = self.active_B.astype(self.self_lengths_B.dtype)
        return self.replace(self_lengths_B=self.self_lengths_B + step_B)

