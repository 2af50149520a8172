"""Whisper's audio encoder; its decoder is :func:`encdec.models.transformer.decode` unchanged.

The decoder differs from BART's only in config (``ModelConfig.from_hf`` for ``whisper``): pre-LN
blocks, learned positions from row 0, no bias on the ``k`` projections (their ``b`` is simply
absent), a tied head. The engine therefore runs it like any other decoder; only the encoder
entry point differs, reading log-mel features ``[B, C, A]`` instead of token ids.

Extra parameters under ``encoder`` (besides ``layers``, ``final_norm``, ``pos_embedding_KD``):
``conv1`` and ``conv2``, each ``w`` ``[W, C, D]`` (taps, input channels, output) and ``b`` ``[D]``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from encdec.config import ModelConfig
from encdec.models.attention import relative_bias
from encdec.models.layers import Params, activation, project
from encdec.models.transformer import _sub, encoder_layers

CONV_TAPS = 3
"""Both stem convolutions have kernel 3 and padding 1; the second has stride 2."""


def conv1d(p: Params, x_BAC: jax.Array, *, stride: int, lora: Params | None = None) -> jax.Array:
    """Kernel-3, padding-1 convolution over time as one :func:`project` on stacked windows."""
    A = x_BAC.shape[1]
    out_len = (A - 1) // stride + 1
    x_pad = jnp.pad(x_BAC, ((0, 0), (1, 1), (0, 0)))
    span = stride * (out_len - 1) + 1
    windows_BAWC = jnp.stack([x_pad[:, w : w + span : stride] for w in range(CONV_TAPS)], axis=2)
    return project(p, windows_BAWC, "BAWC,WCD->BAD", lora)


def encode_audio(
    params: Params,
    cfg: ModelConfig,
    mel_BCA: jax.Array,
    *,
    dtype: jnp.dtype = jnp.float32,
    lora: Params | None = None,
) -> jax.Array:
    """Encoder states ``[B, S, D]`` for log-mel windows ``[B, num_mel_bins, 2 * audio_positions]``.

    Whisper always encodes full 30 s windows (silence-padded), so there is no mask: every one of
    the ``S`` outputs is attended to by the decoder.
    """
    if not cfg.is_audio:
        raise ValueError(f"{cfg.model_type} has no audio encoder (num_mel_bins=0)")
    expected = (cfg.num_mel_bins, 2 * cfg.audio_positions)
    if mel_BCA.ndim != 3 or tuple(mel_BCA.shape[1:]) != expected:
        raise ValueError(
            f"log-mel input has shape {tuple(mel_BCA.shape)}, expected [B, {expected[0]}, {expected[1]}]"
        )
    enc, enc_lora = params["encoder"], _sub(lora, "encoder")
    x_BAC = jnp.swapaxes(mel_BCA.astype(dtype), 1, 2)
    x_BAD = activation("gelu", conv1d(enc["conv1"], x_BAC, stride=1, lora=_sub(enc_lora, "conv1")))
    x_BSD = activation("gelu", conv1d(enc["conv2"], x_BAD, stride=2, lora=_sub(enc_lora, "conv2")))
    x_BSD = x_BSD + enc["pos_embedding_KD"][None, : x_BSD.shape[1]].astype(dtype)
    mask_BS = jnp.ones(x_BSD.shape[:2], bool)
    return encoder_layers(enc, cfg, x_BSD, mask_BS, lora=enc_lora)


def sinusoids(num_positions: int, dim: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's encoder position table: sines then cosines, timescales spaced over ``dim / 2 - 1``.

    Checkpoints store the table; this recomputes it for random initialisation and checks.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    half = dim // 2
    inv_timescale = np.exp(-np.log(max_timescale) / (half - 1) * np.arange(half))
    angle = np.arange(num_positions)[:, None] * inv_timescale[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def _attend(q_BTNH, k_BNKH, v_BNKH, *, scale, mask_BTK, bias_BNTK=None):
    """``dot_product_attention`` over head-major keys; rows with no valid key return zeros."""
    logits_BNTK = jnp.einsum(
        "BNTH,BNKH->BNTK", jnp.swapaxes(q_BTNH, 1, 2), k_BNKH, preferred_element_type=jnp.float32
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


@flax.struct.dataclass
class HeadMajorKV:
    """A dense :class:`~encdec.models.kv.DecoderKV` laid out for XLA:CPU: one array per layer,
    heads before positions.

    Same semantics as ``DenseKV``. Two layout choices, each measured on this project's 2-core
    machines for one decode step over Whisper's 1,500 encoder positions: heads before positions
    (batch-like axes leading) make the attention einsums ~10x faster, and separate per-layer
    arrays avoid slicing a stacked ``[L, ...]`` cache inside the step, which cost ~5x the
    attention itself (batch 16: 550 ms -> ~70 ms for six layers of cross-attention).
    """

    self_k_BNKH: tuple[jax.Array, ...]
    """One per decoder layer, like every tuple field."""
    self_v_BNKH: tuple[jax.Array, ...]
    cross_k_BNSH: tuple[jax.Array, ...]
    cross_v_BNSH: tuple[jax.Array, ...]
    cross_mask_BS: jax.Array
    index: jax.Array  # int32 scalar: tokens stored so far

    def self_attention(self, layer, q_BTNH, k_BTNH, v_BTNH, positions_BT, *, scale, bias_NR, max_distance):
        start = (0, 0, self.index, 0)
        k_BNKH = jax.lax.dynamic_update_slice(
            self.self_k_BNKH[layer], jnp.swapaxes(k_BTNH, 1, 2).astype(self.self_k_BNKH[layer].dtype), start
        )
        v_BNKH = jax.lax.dynamic_update_slice(
            self.self_v_BNKH[layer], jnp.swapaxes(v_BTNH, 1, 2).astype(self.self_v_BNKH[layer].dtype), start
        )
        k_pos_K = jnp.arange(k_BNKH.shape[2], dtype=jnp.int32)
        mask_BTK = k_pos_K[None, None, :] <= positions_BT[:, :, None]
        bias = None
        if bias_NR is not None:
            bias = relative_bias(
                bias_NR, positions_BT, k_pos_K, bidirectional=False, max_distance=max_distance
            )
        out = _attend(q_BTNH, k_BNKH, v_BNKH, scale=scale, mask_BTK=mask_BTK, bias_BNTK=bias)
        return out, self.replace(
            self_k_BNKH=_replace_at(self.self_k_BNKH, layer, k_BNKH),
            self_v_BNKH=_replace_at(self.self_v_BNKH, layer, v_BNKH),
        )

    def cross_attention(self, layer, q_BTNH, *, scale):
        B, T = q_BTNH.shape[:2]
        mask_BTS = jnp.broadcast_to(self.cross_mask_BS[:, None, :], (B, T, self.cross_mask_BS.shape[1]))
        return _attend(
            q_BTNH, self.cross_k_BNSH[layer], self.cross_v_BNSH[layer], scale=scale, mask_BTK=mask_BTS
        )

    def advance(self, num_tokens):
        return self.replace(index=self.index + num_tokens)


def _replace_at(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1 :]


def init_head_major_kv(
    params: Params,
    cfg: ModelConfig,
    enc_BSD: jax.Array,
    enc_mask_BS: jax.Array,
    max_decode_len: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    lora: Params | None = None,
) -> HeadMajorKV:
    """Like ``init_dense_kv``: every layer's cross K/V projected once, in the head-major layout."""
    B = enc_BSD.shape[0]
    ks, vs = [], []
    for i, layer in enumerate(params["decoder"]["layers"]):
        layer_lora = _sub(lora, "decoder", "layers", i, "cross_attn")
        for name, out in (("k", ks), ("v", vs)):
            x_BSNH = project(layer["cross_attn"][name], enc_BSD, "BSD,DNH->BSNH", _sub(layer_lora, name))
            out.append(jnp.swapaxes(x_BSNH, 1, 2).astype(dtype))
    shape = (B, cfg.decoder_heads, max_decode_len, cfg.head_dim)
    return HeadMajorKV(
        self_k_BNKH=tuple(jnp.zeros(shape, dtype) for _ in ks),
        self_v_BNKH=tuple(jnp.zeros(shape, dtype) for _ in ks),
        cross_k_BNSH=tuple(ks),
        cross_v_BNSH=tuple(vs),
        cross_mask_BS=enc_mask_BS.astype(bool),
        index=jnp.zeros((), jnp.int32),
    )
