"""The encoder-decoder transformer for every family ModelConfig describes.

Parameters are a plain nested dict (see ``encdec.checkpoints.hf`` for the names):

- ``shared/embedding_VD``; ``lm_head/w`` (``[D, V]``, untied heads only); ``final_logits_bias_V``
- ``encoder`` and ``decoder``: ``layers`` (a list), ``final_norm``, ``embed_norm``,
  ``pos_embedding_KD`` (learned or sinusoidal), ``rel_bias_NR`` (T5 and mT5: layer 0's table,
  shared by every layer), ``embedding_VD`` (decoder only, when not shared)
- a layer: ``attn``/``cross_attn`` (``q``, ``k``, ``v``: ``w`` ``[D, N, H]``; ``o``: ``w``
  ``[N, H, D]``), ``ffn`` (``wi`` or ``wi_0``/``wi_1``: ``[D, F]``; ``wo``: ``[F, D]``), one
  norm per block (``attn_norm``, ``cross_attn_norm``, ``ffn_norm``) and, in UMT5, the layer's own
  ``rel_bias_NR``.

The encoder's ``N`` and ``H`` may differ from the decoder's (BART-family configs with unequal
head counts); cross-attention projects the encoder states with the decoder's.

Under float16 the T5 family keeps its residual stream in float32 and takes the FFN output
projection's result in float32 (``ModelConfig.float16_residual_in_float32``): every block still
computes in float16, only the sums that outgrow float16 do not.

``lora`` arguments mirror the parameter tree (see ``encdec.lora``) and may be ``None``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from encdec.config import ModelConfig
from encdec.models.attention import dot_product_attention, relative_bias
from encdec.models.kv import DecoderKV, DenseKV
from encdec.models.layers import Params, activation, norm, project

# BART's learned position table reserves its first two rows (``ModelConfig.learned_position_offset``).
LEARNED_POSITION_OFFSET = 2


def _sub(tree: Any, *keys: Any) -> Any:
    for key in keys:
        if tree is None:
            return None
        if isinstance(tree, list):
            tree = tree[key] if key < len(tree) else None
        else:
            tree = tree.get(key)
    return tree


def attention_scale(cfg: ModelConfig, head_dim: int | None = None) -> float:
    """The query scale of attention with ``head_dim``-wide heads (the decoder's by default)."""
    return (head_dim or cfg.head_dim) ** -0.5 if cfg.attention_scale else 1.0


def residual_dtype(cfg: ModelConfig, dtype: jnp.dtype) -> jnp.dtype:
    """The residual stream's dtype when blocks compute in ``dtype``."""
    if cfg.float16_residual_in_float32 and jnp.dtype(dtype) == jnp.float16:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def _embed(
    stack: Params, params: Params, cfg: ModelConfig, ids_BT: jax.Array, positions_BT: jax.Array, dtype
):
    """Token plus position embeddings. ``padded_sinusoidal`` (M2M100/NLLB) reads row
    ``pad + 1 + position``, and the all-zero row ``pad`` for pad tokens and negative positions."""
    owner = stack if "embedding_VD" in stack else params["shared"]
    x_BTD = owner["embedding_VD"][ids_BT].astype(dtype)
    if "embedding_scale_V" in owner:  # int8 table (encdec.models.quant): dequantize the rows read
        x_BTD = x_BTD * owner["embedding_scale_V"][ids_BT][..., None].astype(dtype)
    if cfg.embed_scale != 1.0:
        x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, dtype)
    if cfg.position == "learned":
        x_BTD = x_BTD + stack["pos_embedding_KD"][positions_BT + cfg.learned_position_offset].astype(dtype)
    elif cfg.position == "sinusoidal":
        x_BTD = x_BTD + stack["pos_embedding_KD"][positions_BT].astype(dtype)
    elif cfg.position == "padded_sinusoidal":
        pad = cfg.pad_token_id
        rows_BT = jnp.where((ids_BT == pad) | (positions_BT < 0), pad, positions_BT + pad + 1)
        x_BTD = x_BTD + stack["pos_embedding_KD"][rows_BT].astype(dtype)
    if cfg.embedding_norm:
        x_BTD = norm(stack["embed_norm"], x_BTD, cfg)
    return x_BTD


def _ffn(
    p: Params, x_BTD: jax.Array, cfg: ModelConfig, lora: Params | None, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """The FFN; ``out_dtype`` is the output projection's result dtype (float32 accumulation)."""
    if cfg.gated_ffn:
        h_BTF = activation(cfg.activation, project(p["wi_0"], x_BTD, "BTD,DF->BTF", _sub(lora, "wi_0")))
        h_BTF = h_BTF * project(p["wi_1"], x_BTD, "BTD,DF->BTF", _sub(lora, "wi_1"))
    else:
        h_BTF = activation(cfg.activation, project(p["wi"], x_BTD, "BTD,DF->BTF", _sub(lora, "wi")))
    return project(p["wo"], h_BTF, "BTF,FD->BTD", _sub(lora, "wo"), out_dtype=out_dtype)


def _block(p_norm: Params, x_BTD: jax.Array, cfg: ModelConfig, fn, dtype) -> tuple[jax.Array, Any]:
    """Residual block, pre- or post-norm; ``fn`` computes in ``dtype`` and returns ``(delta, aux)``.

    The residual ``x_BTD`` keeps its own dtype (see :func:`residual_dtype`).
    """
    if cfg.pre_norm:
        delta, aux = fn(norm(p_norm, x_BTD, cfg).astype(dtype))
        return x_BTD + delta.astype(x_BTD.dtype), aux
    delta, aux = fn(x_BTD.astype(dtype))
    return norm(p_norm, x_BTD + delta.astype(x_BTD.dtype), cfg), aux


def _ffn_out_dtype(cfg: ModelConfig, dtype) -> jnp.dtype | None:
    res = residual_dtype(cfg, dtype)
    return res if res != jnp.dtype(dtype) else None


def _encoder_bias(table_NR: jax.Array, cfg: ModelConfig, S: int) -> jax.Array:
    pos_S = jnp.arange(S, dtype=jnp.int32)
    return relative_bias(
        table_NR, pos_S[None], pos_S, bidirectional=True, max_distance=cfg.relative_max_distance
    )


def _decoder_bias_table(dec: Params, layer: Params, cfg: ModelConfig) -> jax.Array | None:
    """The relative-bias table a decoder layer's self-attention adds (T5 family), or None."""
    if not cfg.is_t5:
        return None
    return layer["rel_bias_NR"] if cfg.relative_bias_per_layer else dec["rel_bias_NR"]


def _qkv(p: Params, x_BTD: jax.Array, lora: Params | None, names=("q", "k", "v")):
    return [project(p[n], x_BTD, "BTD,DNH->BTNH", _sub(lora, n)) for n in names]


def encode(
    params: Params,
    cfg: ModelConfig,
    input_ids_BS: jax.Array,
    mask_BS: jax.Array,
    *,
    dtype: jnp.dtype = jnp.float32,
    lora: Params | None = None,
) -> jax.Array:
    """Encoder states ``[B, S, D]`` (in ``dtype``) for right- or left-padded inputs (``mask_BS``
    true on tokens).

    M2M100/NLLB number only the non-pad tokens (HF derives positions from the ids, fairseq's way),
    so a left-padded row gets the positions of the same row right-padded.
    """
    enc, enc_lora = params["encoder"], _sub(lora, "encoder")
    if cfg.position == "padded_sinusoidal":
        counted_BS = (input_ids_BS != cfg.pad_token_id) & mask_BS.astype(bool)
        positions_BS = jnp.where(counted_BS, jnp.cumsum(counted_BS, axis=1, dtype=jnp.int32) - 1, -1)
    else:
        pos_S = jnp.arange(input_ids_BS.shape[1], dtype=jnp.int32)
        positions_BS = jnp.broadcast_to(pos_S, input_ids_BS.shape)
    x_BSD = _embed(enc, params, cfg, input_ids_BS, positions_BS, dtype)
    return encoder_layers(enc, cfg, x_BSD, mask_BS, lora=enc_lora)


def encoder_layers(
    enc: Params,
    cfg: ModelConfig,
    x_BSD: jax.Array,
    mask_BS: jax.Array,
    *,
    lora: Params | None = None,
    blocks: slice = slice(None),
    final_norm: bool = True,
) -> jax.Array:
    """The encoder's layers and final norm over embedded inputs (shared by text and audio encoders).

    ``enc`` and ``lora`` are the ``encoder`` subtrees of the parameters and adapters; the blocks
    compute in ``x_BSD``'s dtype, and so is the result. ``blocks`` and ``final_norm`` run part of
    the stack: layer ``i``'s attention is block ``2 i``, its feed-forward ``2 i + 1`` (a trainer
    caches the residual stream below its first adapted block).
    """
    dtype = x_BSD.dtype
    S = x_BSD.shape[1]
    mask_BSS = jnp.broadcast_to(mask_BS[:, None, :], (mask_BS.shape[0], S, S))
    shared_bias = None
    if cfg.is_t5 and not cfg.relative_bias_per_layer:
        shared_bias = _encoder_bias(enc["rel_bias_NR"], cfg, S)
    scale = attention_scale(cfg, cfg.encoder_head_dim)
    ffn_out = _ffn_out_dtype(cfg, dtype)
    x_BSD = x_BSD.astype(residual_dtype(cfg, dtype))
    run = range(2 * len(enc["layers"]))[blocks]
    for i, layer in enumerate(enc["layers"]):
        if 2 * i not in run and 2 * i + 1 not in run:
            continue
        ll = _sub(lora, "layers", i)
        bias = _encoder_bias(layer["rel_bias_NR"], cfg, S) if cfg.relative_bias_per_layer else shared_bias

        def self_attn(h_BSD, layer=layer, ll=ll, bias=bias):
            q, k, v = _qkv(layer["attn"], h_BSD, _sub(ll, "attn"))
            k_BNSH, v_BNSH = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            out = dot_product_attention(q, k_BNSH, v_BNSH, scale=scale, mask_BTK=mask_BSS, bias_BNTK=bias)
            return project(layer["attn"]["o"], out, "BTNH,NHD->BTD", _sub(ll, "attn", "o")), None

        def ffn(h_BSD, layer=layer, ll=ll):
            return _ffn(layer["ffn"], h_BSD, cfg, _sub(ll, "ffn"), ffn_out), None

        if 2 * i in run:
            x_BSD, _ = _block(layer["attn_norm"], x_BSD, cfg, self_attn, dtype)
        if 2 * i + 1 in run:
            x_BSD, _ = _block(layer["ffn_norm"], x_BSD, cfg, ffn, dtype)
    if cfg.final_norm and final_norm:
        x_BSD = norm(enc["final_norm"], x_BSD, cfg)
    return x_BSD.astype(dtype)


def project_cross_kv(
    params: Params, cfg: ModelConfig, enc_BSD: jax.Array, *, lora: Params | None = None
) -> tuple[jax.Array, jax.Array]:
    """Every decoder layer's cross-attention K and V, stacked: ``[L, B, S, N, H]`` each."""
    ks, vs = [], []
    for i, layer in enumerate(params["decoder"]["layers"]):
        k, v = _qkv(
            layer["cross_attn"], enc_BSD, _sub(lora, "decoder", "layers", i, "cross_attn"), ("k", "v")
        )
        ks.append(k)
        vs.append(v)
    return jnp.stack(ks), jnp.stack(vs)


def decode(
    params: Params,
    cfg: ModelConfig,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    kv: DecoderKV,
    *,
    dtype: jnp.dtype = jnp.float32,
    lora: Params | None = None,
) -> tuple[jax.Array, DecoderKV]:
    """Run the decoder on new tokens at ``positions_BT``; return float32 logits and the updated kv."""
    dec, dec_lora = params["decoder"], _sub(lora, "decoder")
    x_BTD = _embed(dec, params, cfg, tokens_BT, positions_BT, dtype).astype(residual_dtype(cfg, dtype))
    scale = attention_scale(cfg)
    ffn_out = _ffn_out_dtype(cfg, dtype)
    for i, layer in enumerate(dec["layers"]):
        ll = _sub(dec_lora, "layers", i)
        bias_NR = _decoder_bias_table(dec, layer, cfg)

        def self_attn(h_BTD, layer=layer, ll=ll, i=i, kv=kv, bias_NR=bias_NR):
            q, k, v = _qkv(layer["attn"], h_BTD, _sub(ll, "attn"))
            out, kv = kv.self_attention(
                i, q, k, v, positions_BT, scale=scale, bias_NR=bias_NR, max_distance=cfg.relative_max_distance
            )
            return project(layer["attn"]["o"], out, "BTNH,NHD->BTD", _sub(ll, "attn", "o")), kv

        def cross_attn(h_BTD, layer=layer, ll=ll, i=i, kv=kv):
            (q,) = _qkv(layer["cross_attn"], h_BTD, _sub(ll, "cross_attn"), ("q",))
            out = kv.cross_attention(i, q, scale=scale)
            return project(layer["cross_attn"]["o"], out, "BTNH,NHD->BTD", _sub(ll, "cross_attn", "o")), None

        def ffn(h_BTD, layer=layer, ll=ll):
            return _ffn(layer["ffn"], h_BTD, cfg, _sub(ll, "ffn"), ffn_out), None

        x_BTD, kv = _block(layer["attn_norm"], x_BTD, cfg, self_attn, dtype)
        x_BTD, _ = _block(layer["cross_attn_norm"], x_BTD, cfg, cross_attn, dtype)
        x_BTD, _ = _block(layer["ffn_norm"], x_BTD, cfg, ffn, dtype)
    if cfg.final_norm:
        x_BTD = norm(dec["final_norm"], x_BTD, cfg)
    return logits(params, cfg, x_BTD.astype(dtype)), kv.advance(tokens_BT.shape[1])


def tied_head_owner(params: Params) -> str:
    """The key of the subtree holding a tied head's table: the decoder's own embedding, or the
    one it shares with the encoder."""
    return "decoder" if "embedding_VD" in params["decoder"] else "shared"


def logits(params: Params, cfg: ModelConfig, x_BTD: jax.Array) -> jax.Array:
    """LM head in float32 accumulation: tied (with T5's rescale) or untied, plus BART's logits bias
    (the head's ``b``: an int8 product adds it as it stores)."""
    if cfg.tied_output_rescale:
        x_BTD = x_BTD * jnp.asarray(cfg.d_model**-0.5, x_BTD.dtype)
    if cfg.tie_word_embeddings:
        owner = params[tied_head_owner(params)]
        # The table's transpose, packed for the CPU kernels (encdec.models.packing).
        if "head_tiles" in owner:
            head, eq = {"w_tiles": owner["head_tiles"], "w_scale": owner["embedding_scale_V"]}, "BTD,DV->BTV"
        elif "head_panels" in owner:
            head, eq = {"w": owner["embedding_VD"], "w_panels": owner["head_panels"]}, "BTD,VD->BTV"
        else:
            head, eq = {"w": owner["embedding_VD"]}, "BTD,VD->BTV"
            if "embedding_scale_V" in owner:
                head["w_scale"] = owner["embedding_scale_V"]
    else:
        head, eq = dict(params["lm_head"]), "BTD,DV->BTV"
    if cfg.final_logits_bias:
        bias_V = params["final_logits_bias_V"].astype(jnp.float32)
        head["b"] = head["b"].astype(jnp.float32) + bias_V if "b" in head else bias_V
    out_BTV = project(head, x_BTD, eq, out_dtype=jnp.float32)
    # A vocabulary padded to split evenly over devices (encdec.sharding) ends at the real one.
    return out_BTV[..., : cfg.decoder_vocab_size]


def init_dense_kv(
    params: Params,
    cfg: ModelConfig,
    enc_BSD: jax.Array,
    enc_mask_BS: jax.Array,
    max_decode_len: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    lora: Params | None = None,
) -> DenseKV:
    """A dense cache for ``max_decode_len`` decoder tokens over these encoder states."""
    B = enc_BSD.shape[0]
    cross_k, cross_v = [], []
    for i, layer in enumerate(params["decoder"]["layers"]):
        k, v = _qkv(
            layer["cross_attn"], enc_BSD, _sub(lora, "decoder", "layers", i, "cross_attn"), ("k", "v")
        )
        cross_k.append(jnp.swapaxes(k, 1, 2).astype(dtype))
        cross_v.append(jnp.swapaxes(v, 1, 2).astype(dtype))
    shape = (B, cfg.decoder_heads, max_decode_len, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(2 * cfg.decoder_layers))
    return DenseKV(
        self_k_BNKH=zeros[: cfg.decoder_layers],
        self_v_BNKH=zeros[cfg.decoder_layers :],
        cross_k_BNSH=tuple(cross_k),
        cross_v_BNSH=tuple(cross_v),
        cross_mask_BS=enc_mask_BS.astype(bool),
        index=jnp.zeros((), jnp.int32),
    )
