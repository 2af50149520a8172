"""``PagedKV``: the decoder's attention state over the dual page pools, one decode step at a time.

It implements :class:`encdec.models.kv.DecoderKV`, so ``encdec.models.decode`` runs unchanged
over pages. Each slot (row ``b``) has its own self and cross page tables and lengths; slots
decode at different positions, and inactive slots write nothing and read nothing (their
outputs are zeros and are ignored by the engine).

Pools are updated with one in-place scatter per layer on the stacked ``[L, ...]`` arrays, so a
jitted step that donates the ``PagedKV`` (or the whole engine state) never copies a pool.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from encdec.cache.allocator import SENTINEL_PAGE
from encdec.cache.pools import PagePools, write_layer_pages, write_layer_rows
from encdec.sharding import per_head_shard
from pallas_kernels.paged_attention import paged_attention


@flax.struct.dataclass
class PagedKV:
    """Per-slot paged attention state for one decode step (``T == 1``).

    ``positions_BT`` given to :meth:`self_attention` must equal ``self_lengths_B[:, None]``
    for active slots (the engine embeds the token at that position); the cache places the
    new K/V by ``self_lengths_B``.
    """

    pools: PagePools
    self_page_table_BM: jax.Array
    """Self pages of each slot, in token order; unused entries are the sentinel (0)."""
    self_lengths_B: jax.Array
    """Tokens already stored per slot: the position of the token being decoded."""
    cross_page_table_BM: jax.Array
    """Cross pages of each slot, holding encoder positions ``0 .. cross_lengths - 1``."""
    cross_lengths_B: jax.Array
    """Encoder length of each slot."""
    active_B: jax.Array
    """Slots decoding this step (bool); the others are masked."""
    implementation: str = flax.struct.field(pytree_node=False, default="auto")
    """``paged_attention`` implementation: ``"auto"``, ``"pallas"`` or ``"xla"``."""
    interpret: bool = flax.struct.field(pytree_node=False, default=False)
    """Run the Pallas kernel in interpret mode (CPU tests)."""

    @property
    def page_size(self) -> int:
        """Tokens per page (G), read off the pools' static shape."""
        return self.pools.page_size

    def _attend(
        self,
        q_BTNH,
        k_LNPGH,
        v_LNPGH,
        layer,
        page_table_BM,
        lengths_B,
        *,
        scale,
        bias_NR=None,
        max_distance=128,
    ):
        # The stacked pools go in whole with ``layer``: slicing a layer out here would copy its
        # pool on every call wherever the kernel cannot fuse the slice (Pallas on GPU).
        if q_BTNH.shape[1] != 1:
            raise ValueError(f"PagedKV decodes one token per step; got T={q_BTNH.shape[1]}")
        attend = functools.partial(
            paged_attention,
            scale=float(scale),
            max_distance=max_distance,
            implementation=self.implementation,
            interpret=self.interpret,
            layer=layer,
        )

        def attend_heads(q_BNH, k_LNPGH, v_LNPGH, page_table_BM, lengths_B, bias_NR):
            return attend(q_BNH, k_LNPGH, v_LNPGH, page_table_BM, lengths_B, bias_NR=bias_NR)

        # Under a mesh that splits the heads, each model device runs the kernel on its own heads
        # (XLA cannot partition a custom kernel); elsewhere this is the call itself.
        if self.implementation != "xla":
            attend_heads = per_head_shard(attend_heads, q_BTNH.shape[2], has_bias=bias_NR is not None)
        out_BNH = attend_heads(q_BTNH[:, 0], k_LNPGH, v_LNPGH, page_table_BM, lengths_B, bias_NR)
        return out_BNH[:, None]

    def self_attention(self, layer, q_BTNH, k_BTNH, v_BTNH, positions_BT, *, scale, bias_NR, max_distance):
        """Store the new K/V row at ``self_lengths`` and attend over ``self_lengths + 1`` keys."""
        if k_BTNH.shape[1] != 1:
            raise ValueError(f"PagedKV decodes one token per step; got T={k_BTNH.shape[1]}")
        pools, _ = store_self_row(  # attention reads the pool next: XLA's scatter stays in place
            self.pools, layer, self.self_page_table_BM, self.self_lengths_B, self.active_B,
            k_BTNH[:, 0], v_BTNH[:, 0], implementation="xla",
        )
        lengths_B = jnp.where(self.active_B, self.self_lengths_B.astype(jnp.int32) + 1, 0)
        out_BTNH = self._attend(
            q_BTNH,
            pools.self_k_LNPGH,
            pools.self_v_LNPGH,
            layer,
            self.self_page_table_BM,
            lengths_B,
            scale=scale,
            bias_NR=bias_NR,
            max_distance=max_distance,
        )
        return out_BTNH, self.replace(pools=pools)

    def cross_attention(self, layer, q_BTNH, *, scale):
        """Attend over this layer's cross pages (``cross_lengths`` keys; none for inactive slots)."""
        lengths_B = jnp.where(self.active_B, self.cross_lengths_B.astype(jnp.int32), 0)
        return self._attend(
            q_BTNH,
            self.pools.cross_k_LNPGH,
            self.pools.cross_v_LNPGH,
            layer,
            self.cross_page_table_BM,
            lengths_B,
            scale=scale,
        )

    def advance(self, num_tokens):
        """Active slots stored ``num_tokens`` (1) more tokens."""
        if num_tokens != 1:
            raise ValueError(f"PagedKV decodes one token per step; got {num_tokens}")
        return self.replace(
            self_lengths_B=self.self_lengths_B + self.active_B.astype(self.self_lengths_B.dtype)
        )


def store_self_row(
    pools: PagePools,
    layer: int,
    page_table_BM: jax.Array,
    lengths_B: jax.Array,
    active_B: jax.Array,
    k_BNH: jax.Array,
    v_BNH: jax.Array,
    *,
    implementation: str = "auto",
) -> tuple[PagePools, jax.Array]:
    """Write each active slot's new K/V row at position ``lengths[b]`` of its self pages
    (``implementation``: :func:`~encdec.cache.pools.write_layer_rows`'s).

    Returns the pools and which slots wrote: a slot past its page table's end writes nothing
    (it would otherwise clobber a page).
    """
    G = pools.page_size
    M = page_table_BM.shape[1]
    pos_B = lengths_B.astype(jnp.int32)
    writes_B = active_B & (pos_B < M * G)
    page_slot_B1 = jnp.clip(pos_B // G, 0, M - 1)[:, None]
    page_B = jnp.take_along_axis(page_table_BM, page_slot_B1, axis=1)[:, 0]
    page_B = jnp.where(writes_B, page_B, SENTINEL_PAGE)
    offset_B = pos_B % G
    how = implementation
    pools = pools.replace(
        self_k_LNPGH=write_layer_rows(pools.self_k_LNPGH, layer, page_B, offset_B, k_BNH, implementation=how),
        self_v_LNPGH=write_layer_rows(pools.self_v_LNPGH, layer, page_B, offset_B, v_BNH, implementation=how),
    )
    return pools, writes_B


def write_cross(
    pools: PagePools,
    cross_k_LBSNH: jax.Array,
    cross_v_LBSNH: jax.Array,
    cross_page_table_BM: jax.Array,
    enc_lengths_B: jax.Array,
) -> PagePools:
    """Store every layer's cross K/V (``project_cross_kv`` of right-padded encoder states).

    Row ``b``'s positions ``0 .. enc_lengths_B[b] - 1`` go to its pages in
    ``cross_page_table_BM``; a row of length 0 (a padding row of the encoder batch) writes
    nothing. No page may appear in two rows' used entries (share pages after writing).
    """
    return pools.replace(
        cross_k_LNPGH=write_layer_pages(
            pools.cross_k_LNPGH, cross_page_table_BM, cross_k_LBSNH, enc_lengths_B
        ),
        cross_v_LNPGH=write_layer_pages(
            pools.cross_v_LNPGH, cross_page_table_BM, cross_v_LBSNH, enc_lengths_B
        ),
    )
