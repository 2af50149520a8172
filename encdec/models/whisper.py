"""Whisper's audio encoder; its decoder is :func:`encdec.models.transformer.decode` unchanged.

The decoder differs from BART's only in config (``ModelConfig.from_hf`` for ``whisper``): pre-LN
blocks, learned positions from row 0, no bias on the ``k`` projections (their ``b`` is simply
absent), a tied head. The engine therefore runs it like any other decoder; only the encoder
entry point differs, reading log-mel features ``[B, C, A]`` instead of token ids.

Extra parameters under ``encoder`` (besides ``layers``, ``final_norm``, ``pos_embedding_KD``):
``conv1`` and ``conv2``, each ``w`` ``[W, C, D]`` (taps, input channels, output) and ``b`` ``[D]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from encdec.config import ModelConfig
from encdec.models.layers import Params, activation, project
from encdec.models.quant import encoder_weights
from encdec.models.transformer import _sub, encoder_layers, init_dense_kv

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
    blocks: slice = slice(None),
    final_norm: bool = True,
) -> jax.Array:
    """Encoder states ``[B, S, D]`` for log-mel windows ``[B, num_mel_bins, 2 * audio_positions]``.

    Whisper always encodes full 30 s windows (silence-padded), so there is no mask: every one of
    the ``S`` outputs is attended to by the decoder. ``blocks`` and ``final_norm`` stop part way
    (:func:`encdec.models.transformer.encoder_layers`).
    """
    if not cfg.is_audio:
        raise ValueError(f"{cfg.model_type} has no audio encoder (num_mel_bins=0)")
    expected = (cfg.num_mel_bins, 2 * cfg.audio_positions)
    if mel_BCA.ndim != 3 or tuple(mel_BCA.shape[1:]) != expected:
        raise ValueError(
            f"log-mel input has shape {tuple(mel_BCA.shape)}, expected [B, {expected[0]}, {expected[1]}]"
        )
    enc, enc_lora = encoder_weights(params["encoder"]), _sub(lora, "encoder")
    x_BAC = jnp.swapaxes(mel_BCA.astype(dtype), 1, 2)
    x_BAD = activation("gelu", conv1d(enc["conv1"], x_BAC, stride=1, lora=_sub(enc_lora, "conv1")))
    x_BSD = activation("gelu", conv1d(enc["conv2"], x_BAD, stride=2, lora=_sub(enc_lora, "conv2")))
    x_BSD = x_BSD + enc["pos_embedding_KD"][None, : x_BSD.shape[1]].astype(dtype)
    mask_BS = jnp.ones(x_BSD.shape[:2], bool)
    return encoder_layers(enc, cfg, x_BSD, mask_BS, lora=enc_lora, blocks=blocks, final_norm=final_norm)


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


# Whisper's decoder runs on the shared dense cache (per-layer, heads-first arrays).
init_head_major_kv = init_dense_kv
