"""How the decoder reads and writes attention state, and the dense implementation.

``decode`` talks to a :class:`DecoderKV`; it never sees pages or slots. The dense
``DenseKV`` here serves the reference generator and training; the engine's paged cache
(``encdec.cache``) implements the same protocol over page pools.
"""

from __future__ import annotations

from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp

from encdec.models.attention import dot_product_attention, relative_bias


class DecoderKV(Protocol):
    """Attention state of one decoder pass; methods return updated copies (pure)."""

    def self_attention(
        self,
        layer: int,
        q_BTNH: jax.Array,
        k_BTNH: jax.Array,
        v_BTNH: jax.Array,
        positions_BT: jax.Array,
        *,
        scale: float,
        bias_NR: jax.Array | None,
        max_distance: int,
    ) -> tuple[jax.Array, DecoderKV]:
        """Store the new K/V at ``positions_BT`` and attend causally over everything stored."""
        ...

    def cross_attention(self, layer: int, q_BTNH: jax.Array, *, scale: float) -> jax.Array:
        """Attend over this layer's encoder K/V (padding masked)."""
        ...

    def advance(self, num_tokens: int) -> DecoderKV:
        """Called once after all layers consumed ``num_tokens`` new tokens."""
        ...


@flax.struct.dataclass
class DenseKV:
    """Contiguous cache: every row decodes the same positions ``index .. index+T-1``."""

    self_k_LBKNH: jax.Array
    self_v_LBKNH: jax.Array
    cross_k_LBSNH: jax.Array
    cross_v_LBSNH: jax.Array
    cross_mask_BS: jax.Array
    index: jax.Array  # int32 scalar: tokens stored so far

    def self_attention(self, layer, q_BTNH, k_BTNH, v_BTNH, positions_BT, *, scale, bias_NR, max_distance):
        start = (layer, 0, self.index, 0, 0)
        k_LBKNH = jax.lax.dynamic_update_slice(
            self.self_k_LBKNH, k_BTNH[None].astype(self.self_k_LBKNH.dtype), start
        )
        v_LBKNH = jax.lax.dynamic_update_slice(
            self.self_v_LBKNH, v_BTNH[None].astype(self.self_v_LBKNH.dtype), start
        )
        k_pos_K = jnp.arange(k_LBKNH.shape[2], dtype=jnp.int32)
        mask_BTK = k_pos_K[None, None, :] <= positions_BT[:, :, None]
        bias = None
        if bias_NR is not None:
            bias = relative_bias(
                bias_NR, positions_BT, k_pos_K, bidirectional=False, max_distance=max_distance
            )
        out = dot_product_attention(
            q_BTNH, k_LBKNH[layer], v_LBKNH[layer], scale=scale, mask_BTK=mask_BTK, bias_BNTK=bias
        )
        return out, self.replace(self_k_LBKNH=k_LBKNH, self_v_LBKNH=v_LBKNH)

    def cross_attention(self, layer, q_BTNH, *, scale):
        T = q_BTNH.shape[1]
        mask_BTS = jnp.broadcast_to(
            self.cross_mask_BS[:, None, :], (q_BTNH.shape[0], T, self.cross_mask_BS.shape[1])
        )
        return dot_product_attention(
            q_BTNH, self.cross_k_LBSNH[layer], self.cross_v_LBSNH[layer], scale=scale, mask_BTK=mask_BTS
        )

    def advance(self, num_tokens):
        return self.replace(index=self.index + num_tokens)
