"""The encoder-decoder transformer for every family ModelConfig describes.

Parameters are a plain nested dict (see ``encdec.checkpoints.hf`` for the names):

- ``shared/embedding_VD``; ``lm_head/w`` (``[D, V]``, untied heads only); ``final_logits_bias_V``
- ``encoder`` and ``decoder``: ``layers`` (a list), ``final_norm``, ``embed_norm``,
  ``pos_embedding_KD`` (learned or sinusoidal), ``rel_bias_NR`` (T5, from layer 0),
  ``embedding_VD`` (decoder only, when not shared)
- a layer: ``attn``/``cross_attn`` (``q``, ``k``, ``v``: ``w`` ``[D, N, H]``; ``o``: ``w``
  ``[N, H, D]``), ``ffn`` (``wi`` or ``wi_0``/``wi_1``: ``[D, F]``; ``wo``: ``[F, D]``) and
  one norm per block (``attn_norm``, ``cross_attn_norm``, ``ffn_norm``).

``lora`` arguments mirror the parameter tree (see ``encdec.lora``) and may be ``None``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from encdec.config import ModelConfig
from encdec.models.attention import dot_product_attention, relative_bias
from encdec.models.kv import DecoderKV, DenseKV
from encdec.models.layers import Params, activation, lead, norm, project

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


def attention_scale(cfg: ModelConfig) -> float:
    return cfg.head_dim**-0.5 if cfg.attention_scale else 1.0


def _embed(
    stack: Params, params: Params, cfg: ModelConfig, ids_BT: jax.Array, positions_BT: jax.Array, dtype
):
    table_VD = stack.get("embedding_VD", params["shared"]["embedding_VD"])
    x_BTD = table_VD[ids_BT].astype(dtype)
    if cfg.embed_scale != 1.0:
        x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, dtype)
    if cfg.position == "learned":
        x_BTD = x_BTD + stack["pos_embedding_KD"][positions_BT + cfg.learned_position_offset].astype(dtype)
    elif cfg.position == "sinusoidal":
        x_BTD = x_BTD + stack["pos_embedding_KD"][positions_BT].astype(dtype)
    if cfg.embedding_norm:
        x_BTD = norm(stack["embed_norm"], x_BTD, cfg)
    return x_BTD


def _ffn(p: Params, x_BTD: jax.Array, cfg: ModelConfig, lora: Params | None) -> jax.Array:
    if cfg.gated_ffn:
        h_BTF = activation(cfg.activation, project(p["wi_0"], x_BTD, "BTD,DF->BTF", _sub(lora, "wi_0")))
        h_BTF = h_BTF * project(p["wi_1"], x_BTD, "BTD,DF->BTF", _sub(lora, "wi_1"))
    else:
        h_BTF = activation(cfg.activation, project(p["wi"], x_BTD, "BTD,DF->BTF", _sub(lora, "wi")))
    return project(p["wo"], h_BTF, "BTF,FD->BTD", _sub(lora, "wo"))


def _block(p_norm: Params, x_BTD: jax.Array, cfg: ModelConfig, fn) -> tuple[jax.Array, Any]:
    """Residual block, pre- or post-norm; ``fn`` returns ``(delta, aux)``."""
    if cfg.pre_norm:
        delta, aux = fn(norm(p_norm, x_BTD, cfg))
        return x_BTD + delta, aux
    delta, aux = fn(x_BTD)
    return norm(p_norm, x_BTD + delta, cfg), aux


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
    """Encoder states ``[B, S, D]`` for right- or left-padded inputs (``mask_BS`` true on tokens)."""
    enc, enc_lora = params["encoder"], _sub(lora, "encoder")
    S = input_ids_BS.shape[1]
    pos_S = jnp.arange(S, dtype=jnp.int32)
    x_BSD = _embed(enc, params, cfg, input_ids_BS, jnp.broadcast_to(pos_S, input_ids_BS.shape), dtype)
    bias = None
    if cfg.is_t5:
        bias = relative_bias(
            enc["rel_bias_NR"], pos_S[None], pos_S, bidirectional=True, max_distance=cfg.relative_max_distance
        )
    return encoder_layers(enc, cfg, x_BSD, mask_BS, bias_BNSS=bias, lora=enc_lora)


def encoder_layers(
    enc: Params,
    cfg: ModelConfig,
    x_BSD: jax.Array,
    mask_BS: jax.Array,
    *,
    bias_BNSS: jax.Array | None = None,
    lora: Params | None = None,
) -> jax.Array:
    """The encoder's layers and final norm over embedded inputs (shared by text and audio encoders).

    ``enc`` and ``lora`` are the ``encoder`` subtrees of the parameters and adapters.
    """
    S = x_BSD.shape[1]
    mask_BSS = jnp.broadcast_to(mask_BS[:, None, :], (mask_BS.shape[0], S, S))
    bias, enc_lora = bias_BNSS, lora
    scale = attention_scale(cfg)
    for i, layer in enumerate(enc["layers"]):
        ll = _sub(enc_lora, "layers", i)

        def self_attn(h_BSD, layer=layer, ll=ll):
            q, k, v = _qkv(layer["attn"], h_BSD, _sub(ll, "attn"))
            k_BNSH, v_BNSH = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            out = dot_product_attention(q, k_BNSH, v_BNSH, scale=scale, mask_BTK=mask_BSS, bias_BNTK=bias)
            return project(layer["attn"]["o"], out, "BTNH,NHD->BTD", _sub(ll, "attn", "o")), None

        x_BSD, _ = _block(layer["attn_norm"], x_BSD, cfg, self_attn)
        x_BSD, _ = _block(
            layer["ffn_norm"],
            x_BSD,
            cfg,
            lambda h, layer=layer, ll=ll: (_ffn(layer["ffn"], h, cfg, _sub(ll, "ffn")), None),
        )
    if cfg.final_norm:
        x_BSD = norm(enc["final_norm"], x_BSD, cfg)
    return x_BSD


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
    x_BTD = _embed(dec, params, cfg, tokens_BT, positions_BT, dtype)
    scale = attention_scale(cfg)
    bias_NR = dec.get("rel_bias_NR") if cfg.is_t5 else None
    for i, layer in enumerate(dec["layers"]):
        ll = _sub(dec_lora, "layers", i)

        def self_attn(h_BTD, layer=layer, ll=ll, i=i, kv=kv):
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
            return _ffn(layer["ffn"], h_BTD, cfg, _sub(ll, "ffn")), None

        x_BTD, kv = _block(layer["attn_norm"], x_BTD, cfg, self_attn)
        x_BTD, _ = _block(layer["cross_attn_norm"], x_BTD, cfg, cross_attn)
        x_BTD, _ = _block(layer["ffn_norm"], x_BTD, cfg, ffn)
    if cfg.final_norm:
        x_BTD = norm(dec["final_norm"], x_BTD, cfg)
    return logits(params, cfg, x_BTD), kv.advance(tokens_BT.shape[1])


def logits(params: Params, cfg: ModelConfig, x_BTD: jax.Array) -> jax.Array:
    """LM head in float32 accumulation: tied (with T5's rescale) or untied, plus BART's logits bias."""
    if cfg.tied_output_rescale:
        x_BTD = x_BTD * jnp.asarray(cfg.d_model**-0.5, x_BTD.dtype)
    if cfg.tie_word_embeddings:
        table_VD = params["decoder"].get("embedding_VD", params["shared"]["embedding_VD"])
        out_BTV = jnp.einsum(
            "BTD,VD->BTV", x_BTD, table_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32
        )
    else:
        out_BTV = jnp.einsum(
            "BTD,DV->BTV",
            x_BTD,
            params["lm_head"]["w"].astype(x_BTD.dtype),
            preferred_element_type=jnp.float32,
        )
    if cfg.final_logits_bias:
        out_BTV = out_BTV + lead(params["final_logits_bias_V"].astype(jnp.float32), 3)
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
