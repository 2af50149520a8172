"""The model's primitives: one projection, norms, activations, position tables.

Every projection in every family goes through :func:`project`, so LoRA, sharding and int8
weights are added in one place.
"""

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encdec.config import ModelConfig
from encdec.models.quant import int8_matmul
from pallas_kernels.decode_matmul import decode_matmul, kernel_applies

DECODE_MATMUL_ENV = "ENCDEC_DECODE_MATMUL"
"""``xla`` keeps XLA's dot for float32 decode rows where the CPU kernel would run (comparisons)."""

Params = Mapping[str, Any]


def lead(x: jax.Array, ndim: int) -> jax.Array:
    """``x`` with leading unit axes up to ``ndim`` (explicit broadcasting: no rank promotion)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def project(
    p: Params, x: jax.Array, eq: str, lora: Params | None = None, *, out_dtype: Any = None
) -> jax.Array:
    """``einsum(eq, x, p["w"]) + p["b"]``, plus a low-rank update when ``lora`` is given.

    ``lora`` holds ``a`` (input dims -> rank) and ``b`` (rank -> output dims) in the same
    layout as ``w`` split at the rank, and ``scale`` (alpha / rank); see ``encdec.lora``.
    ``out_dtype`` (default ``x``'s) is the result's dtype, accumulated in it: float32 out of
    float16 inputs keeps a sum that outgrows float16 finite. An int8 ``w`` comes with
    ``w_scale`` (per output channel, :mod:`encdec.models.quant`), or is packed for the CPU
    kernel as ``w_tiles`` (an engine's, :func:`encdec.models.packing.engine_params`). A float32
    ``w`` may come with ``w_panels``, the same weight packed for the float32 decode kernel (an
    engine's decoder and head), which decode rows read instead; a bfloat16
    ``w`` under float32 activations multiplies ``x`` rounded to bfloat16, in float32. The adapter stays float.
    """
    int8_w = p.get("w_tiles", p.get("w")) if "w_scale" in p else None
    panels = _panel_project(eq, x, p, out_dtype) if "w_panels" in p and int8_w is None else None
    if int8_w is not None:  # the bias is added by the int8 product as it stores
        y = _int8_project(eq, x, int8_w, p["w_scale"], out_dtype, tiles="w_tiles" in p, bias=p.get("b"))
    elif panels is not None:  # with its bias, added by the kernel as it stores
        y = panels
    elif p["w"].dtype == jnp.bfloat16 and x.dtype == jnp.float32:  # quantize="bfloat16"
        y = _as_matmul(eq, x.astype(jnp.bfloat16), p["w"], out_dtype or jnp.float32)
    else:
        y = _as_matmul(eq, x, p["w"].astype(x.dtype), out_dtype)
    if "b" in p and int8_w is None and panels is None:
        y = y + lead(p["b"].astype(y.dtype), y.ndim)
    if lora is not None:
        y = y + lora_delta(lora, x, eq).astype(y.dtype)
    return y


def _specs(eq: str) -> tuple[str, str, str, str]:
    """``(x_spec, w_spec, out_spec, contracted)`` of a projection's einsum ``x,w->out``."""
    lhs, out = eq.split("->")
    x_spec, w_spec = lhs.split(",")
    return x_spec, w_spec, out, "".join(c for c in w_spec if c not in out)


def _as_matmul(eq: str, x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
    """``einsum(eq, x, w)`` as one 2-D matrix product when ``x`` ends and ``w`` starts with the
    contracted axes (every projection here): the reshapes are free, and XLA:CPU otherwise picked
    layouts that transposed the attention output weight ``[N, H, D]`` on every decode step."""
    x_spec, w_spec, out, contracted = _specs(eq)
    n = len(contracted)
    matmul_shaped = x_spec.endswith(contracted) and w_spec.startswith(contracted)
    if not (matmul_shaped and out == x_spec[:-n] + w_spec[n:]):
        return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)
    size = int(np.prod(w.shape[:n]))
    x_MK, w_KN = x.reshape(-1, size), w.reshape(size, -1)
    kernel = out_dtype in (None, jnp.float32) and os.environ.get(DECODE_MATMUL_ENV) != "xla"
    if kernel and kernel_applies(x_MK, w_KN):  # decode rows: the weights read at memory speed
        y = decode_matmul(x_MK, w_KN, implementation="kernel")
    else:
        y = jnp.dot(x_MK, w_KN, preferred_element_type=out_dtype)
    return y.reshape(x.shape[:-n] + w.shape[n:])


def _panel_project(eq: str, x: jax.Array, p: Params, out_dtype: Any) -> jax.Array | None:
    """:func:`project`'s product through ``p["w_panels"]`` (``p["w"]`` packed by
    :func:`~pallas_kernels.decode_matmul.pack_panels` as ``[K, N]``: its contracted dims, then the
    rest, in either order), plus ``p["b"]``, or None where the decode kernel does not take it (more
    rows, other dtypes): then ``w`` serves."""
    x_spec, w_spec, out, contracted = _specs(eq)
    n = len(contracted)
    kept = "".join(c for c in w_spec if c in out)
    if not (x_spec.endswith(contracted) and out == x_spec[:-n] + kept) or out_dtype not in (
        None,
        jnp.float32,
    ):
        return None
    sizes = dict(zip(w_spec, p["w"].shape, strict=True))
    x_MK = x.reshape(-1, math.prod(sizes[c] for c in contracted))
    if os.environ.get(DECODE_MATMUL_ENV) == "xla" or not kernel_applies(x_MK, p["w_panels"]):
        return None
    N = math.prod(sizes[c] for c in kept)
    bias_N = p["b"].astype(jnp.float32).reshape(N) if "b" in p else None
    y = decode_matmul(x_MK, p["w_panels"], w_layout="panels", n=N, bias_N=bias_N, implementation="kernel")
    return y.reshape(x.shape[:-n] + tuple(sizes[c] for c in kept))


def _int8_project(
    eq: str,
    x: jax.Array,
    w: jax.Array,
    scale: jax.Array,
    out_dtype: Any,
    *,
    tiles: bool = False,
    bias: jax.Array | None = None,
) -> jax.Array:
    """:func:`project`'s product for an int8 ``w``: one :func:`int8_matmul` over ``x``'s trailing
    contracted dims and ``w``'s output dims flattened (``w``'s are leading, as in every projection,
    or trailing, as in a tied head ``VD``); ``tiles``: ``w`` is such a weight with leading
    contracted dims, packed for the CPU kernel; ``bias`` has ``scale``'s shape."""
    x_spec, w_spec, out, contracted = _specs(eq)
    kept = "".join(c for c in w_spec if c in out)
    n = len(contracted)
    bounded = w_spec in ((contracted + kept,) if tiles else (contracted + kept, kept + contracted))
    if not (x_spec.endswith(contracted) and out == x_spec[:-n] + kept and bounded):
        raise ValueError(f"int8 projection {eq!r}: contracted dims must end x and bound w")
    size = int(np.prod(x.shape[-n:]))
    x_MK, scale_N = x.reshape(-1, size), scale.reshape(-1)
    bias_N = None if bias is None else bias.reshape(-1)
    if tiles:
        y = int8_matmul(x_MK, w, scale_N, bias_N, out_dtype=out_dtype, w_layout="tiles")
    elif w_spec.startswith(contracted):
        y = int8_matmul(x_MK, w.reshape(size, -1), scale_N, bias_N, out_dtype=out_dtype)
    else:
        y = int8_matmul(x_MK, w.reshape(-1, size), scale_N, bias_N, out_dtype=out_dtype, w_layout="NK")
    return y.reshape(x.shape[:-n] + scale.shape)


def lora_delta(lora: Params, x: jax.Array, eq: str) -> jax.Array:
    """The low-rank term of :func:`project`: ``scale * (x A) B`` with per-row adapters.

    ``lora["a"]`` is ``[*in, r]`` and ``lora["b"]`` is ``[r, *out]``; with a leading row axis
    (``[B, *in, r]``) each batch row uses its own adapter. During training ``lora`` may also hold
    ``dropout_key`` (a PRNG key) and ``dropout_rate``: dropout on the adapter's input only, as PEFT does.
    """
    x_spec, w_spec, out_spec, in_letters = _specs(eq)
    out_letters = "".join(c for c in w_spec if c in out_spec)
    a, b, scale = lora["a"], lora["b"], lora["scale"]
    per_row = a.ndim == len(in_letters) + 2
    row = x_spec[0]
    a_spec = (row if per_row else "") + in_letters + "r"
    b_spec = (row if per_row else "") + "r" + out_letters
    if "dropout_key" in lora:
        keep = 1.0 - jnp.asarray(lora["dropout_rate"], jnp.float32)
        mask = jax.random.bernoulli(lora["dropout_key"], keep, x.shape)
        x = jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))
    h = jnp.einsum(f"{x_spec},{a_spec}->{x_spec.replace(in_letters, '')}r", x, a.astype(x.dtype))
    h_spec = x_spec.replace(in_letters, "") + "r"
    delta = jnp.einsum(f"{h_spec},{b_spec}->{out_spec}", h, b.astype(x.dtype))
    scale = jnp.asarray(scale, x.dtype)
    if per_row and scale.ndim:
        scale = scale.reshape((-1,) + (1,) * (delta.ndim - 1))
    return delta * scale


def norm(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """RMSNorm (T5) or LayerNorm (BART family), computed in float32."""
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rms":
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        return (lead(p["scale"].astype(jnp.float32), x.ndim) * x32).astype(x.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 - mean
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    scale, bias = (lead(p[k].astype(jnp.float32), x.ndim) for k in ("scale", "bias"))
    return (x32 * scale + bias).astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":  # PyTorch's erf form: jax.nn.gelu's erfc took XLA:CPU twice as long
        return 0.5 * x * (1 + jax.lax.erf(x * 0.5**0.5))
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
    """Marian's position table: sines in the first half of the features, cosines in the second."""
    pos = np.arange(num_positions)[:, None]
    j = np.arange(dim)[None, :]
    angle = pos / np.power(10000, 2 * (j // 2) / dim)
    table = np.zeros((num_positions, dim), dtype=np.float32)
    half = dim // 2 + dim % 2
    table[:, :half] = np.sin(angle[:, 0::2])
    table[:, half:] = np.cos(angle[:, 1::2])
    return table


def padded_sinusoidal_table(num_positions: int, dim: int, pad_token_id: int) -> np.ndarray:
    """M2M100/NLLB's (fairseq's) position table: ``pad_token_id + 1 + num_positions`` rows.

    Sines then cosines, frequencies spaced over ``dim / 2 - 1`` (an odd ``dim`` ends in a zero
    column); row ``pad_token_id`` is all zeros (pad tokens' position) and position ``p`` reads
    row ``pad_token_id + 1 + p``. Computed in float32, as HF does, so the angles round alike.
    """
    half = dim // 2
    step = np.float32(math.log(10000) / (half - 1))
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    angle = np.arange(pad_token_id + 1 + num_positions, dtype=np.float32)[:, None] * freqs[None, :]
    table = np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
    if dim % 2:
        table = np.concatenate([table, np.zeros((len(table), 1), np.float32)], axis=1)
    table[pad_token_id] = 0.0
    return table.astype(np.float32)
