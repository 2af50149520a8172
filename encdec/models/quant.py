"""int8 weights: symmetric, one float scale per output channel, for every projection and the
embedding table (so a tied LM head is int8 too).

Decode is memory-bound (each step reads every decoder weight once), so the bytes a step reads
set its floor; int8 reads a quarter of float32's. A quantized projection holds ``w`` as int8 in
the float layout and ``w_scale`` (float32) shaped like its output dims (``b``'s shape): the
float weight is ``w * w_scale``. The embedding table ``embedding_VD`` is int8 beside
``embedding_scale_V`` (per row: each row is an output channel of the tied head).

Three ways to multiply (:func:`int8_matmul`), chosen per backend (``ENCDEC_INT8_MATMUL``
overrides, read when a step is traced):

- ``kernel``: the CPU default where it runs. Activations quantized per row on the fly
  (symmetric, absmax) and an int8 x int8 -> int32 product in a C++ AVX-512 VNNI kernel that
  XLA calls (:mod:`pallas_kernels.int8_matmul`): it reads the weights at memory speed, where
  XLA:CPU's own int8 dot is compute-bound (``scripts/bench_int8_matmul.py``). CTranslate2's
  int8 quantizes activations the same way.
- ``dynamic``: the same arithmetic through XLA's int8 dot; the CPU fallback where the kernel
  cannot be built (no compiler, no AVX-512 VNNI).
- ``weight_only``: the int8 weight converted inside the jitted dot (activations stay float);
  XLA:GPU fuses the convert into the matmul, so it reads int8 bytes.

All scale the product by ``w_scale`` after the dot (the scale is per output channel, so it
commutes with the contraction).

Whisper's audio encoder is different: its products are compute-bound (1,500 rows a window), so
int8 bytes buy it nothing, and quantizing its activations per row cost Whisper the most accuracy.
It multiplies ``w * w_scale`` rounded to bfloat16 by activations rounded to bfloat16, summed in
float32 (:func:`encoder_weights`). Whisper-base, teacher-forced on 20 clips' float32 transcripts
(212 positions): mean KL from float32 0.0076 -> 0.0047, argmax agreement 0.958 -> 0.972; its
encoder as fast as through the int8 kernel. Text encoders keep the kernel: the engine encodes
them a few short rows at a time, where XLA's bfloat16 products cost t5-small's in-flight
throughput ~12%, and their int8 agreement with float32 is already 0.97-0.995.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_matmul import int8_matmul as int8_kernel_matmul
from pallas_kernels.int8_matmul import int8_matmul_reference as int8_dynamic_matmul
from pallas_kernels.int8_matmul import kernel_available, unpack_tiles

SCHEMES = ("int8", "bfloat16")
"""Known quantization schemes (``load_pretrained(path, quantize=...)``). ``bfloat16``: the same
weights (every projection and embedding table) stored in bfloat16, multiplied by activations
rounded to bfloat16 with float32 accumulation and results (:func:`encdec.models.layers.project`).
On CPUs with AVX512-BF16 XLA runs such products ~1.5x faster than float32 (Whisper-base's encoder
is bound by them) and a decode step reads half the weight bytes; activations, norms, softmax and
the KV cache stay float32."""
METHODS = ("kernel", "dynamic", "weight_only")
"""Ways :func:`int8_matmul` multiplies (see the module doc)."""
METHOD_ENV = "ENCDEC_INT8_MATMUL"

# Leading (input) dims of each projection's ``w``; the rest are output dims (``b``'s shape).
INPUT_DIMS = {
    "q": 1,
    "k": 1,
    "v": 1,
    "o": 2,
    "wi": 1,
    "wi_0": 1,
    "wi_1": 1,
    "wo": 1,
    "lm_head": 1,
    "conv1": 2,
    "conv2": 2,
}


class QuantizationError(ValueError):
    """An unknown scheme, or a model that is already quantized."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return scheme


def is_quantized(params: Any) -> bool:
    """Whether any weight of ``params`` is int8."""
    return any(getattr(leaf, "dtype", None) == jnp.int8 for leaf in jax.tree_util.tree_leaves(params))


def matmul_method() -> str:
    """The int8 matmul for the default backend: ``kernel`` on CPUs that run it, else ``dynamic``;
    ``weight_only`` elsewhere; unless ``ENCDEC_INT8_MATMUL`` names one."""
    method = os.environ.get(METHOD_ENV, "auto")
    if method == "auto":
        if jax.default_backend() != "cpu":
            return "weight_only"
        return "kernel" if kernel_available() else "dynamic"
    if method not in METHODS:
        raise QuantizationError(f"{METHOD_ENV}={method!r} is not one of auto, {', '.join(METHODS)}")
    return method


def quantize_array(w: Any, input_dims: int) -> tuple[jax.Array, jax.Array]:
    """``w`` as int8 with one scale per output channel (its dims after the first ``input_dims``).

    Symmetric absmax: ``scale = max|w| / 127`` over the input dims, ``q = round(w / scale)``; an
    all-zero channel gets scale 1 (its codes are 0).
    """
    return _quantize(jnp.asarray(w), input_dims)


def _quantize_impl(w: jax.Array, input_dims: int) -> tuple[jax.Array, jax.Array]:
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=tuple(range(input_dims)))
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


_quantize = jax.jit(_quantize_impl, static_argnums=1)


def quantize_params(params: Mapping[str, Any], scheme: str = "int8") -> dict[str, Any]:
    """A copy of ``params`` with every projection's ``w`` (incl. cross K/V, the LM head and
    Whisper's convolutions) and every embedding table in int8; norms, biases, position tables
    and T5's relative-bias tables stay float."""
    check_scheme(scheme)
    if is_quantized(params):
        raise QuantizationError("the model's weights are already int8: it is quantized once, at loading")
    if scheme == "bfloat16":
        return _bfloat16_params(params)

    def walk(node: Any, name: str | None) -> Any:
        if isinstance(node, Mapping):
            if "w" in node and not isinstance(node["w"], Mapping):
                if name not in INPUT_DIMS:
                    raise QuantizationError(f"no quantization rule for projection {name!r}")
                out = {k: walk(v, k) for k, v in node.items() if k != "w"}
                out["w"], out["w_scale"] = quantize_array(node["w"], INPUT_DIMS[name])
                return out
            out = {}
            for k, v in node.items():
                if k == "embedding_VD":
                    q_VD, scale_V = quantize_array(jnp.swapaxes(jnp.asarray(v), 0, 1), 1)
                    out[k], out["embedding_scale_V"] = jnp.swapaxes(q_VD, 0, 1), scale_V
                else:
                    out[k] = walk(v, k)
            return out
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, name) for v in node)
        return node

    return walk(params, None)


def _bfloat16_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Every projection's ``w`` and every embedding table in bfloat16; the rest as it is."""

    def leaf(path, x):
        named = getattr(path[-1], "key", None) in ("w", "embedding_VD")
        return jnp.asarray(x, jnp.bfloat16) if named and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map_with_path(leaf, dict(params))


def _float_weight(node: Mapping[str, Any]) -> jax.Array:
    """An int8 projection's float32 weight, ``w * w_scale`` (the scale over its output dims)."""
    w, s = node["w"], node["w_scale"]
    return w.astype(jnp.float32) * s.reshape((1,) * (w.ndim - s.ndim) + s.shape)


def dequantize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The float32 weights an int8 tree stands for (``w * w_scale``): the reference that
    :func:`int8_matmul`'s ``weight_only`` method computes exactly."""

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            out = {k: walk(v) for k, v in node.items() if k not in ("w_scale", "embedding_scale_V")}
            if "w_scale" in node:
                out["w"] = _float_weight(node)
            if "embedding_scale_V" in node:
                out["embedding_VD"] = (
                    node["embedding_VD"].astype(jnp.float32) * node["embedding_scale_V"][:, None]
                )
            return out
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    return walk(params)


def encoder_weights(enc: Mapping[str, Any]) -> dict[str, Any]:
    """An encoder subtree as the encoder multiplies it: each int8 projection becomes a bfloat16
    ``w`` (``w * w_scale`` rounded; :func:`encdec.models.layers.project` then rounds float32
    activations to bfloat16 and sums in float32); float subtrees are returned as they are.
    Called inside the jitted encoder, so the int8 bytes stay the only copy kept."""

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            if "w_scale" not in node:
                return {k: walk(v) for k, v in node.items()}
            out = {k: v for k, v in node.items() if k not in ("w", "w_scale", "w_tiles")}
            out["w"] = _float_weight(node).astype(jnp.bfloat16)
            return out
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    return walk(enc)


_encoder_weights = jax.jit(encoder_weights)


def with_encoder_weights(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """An audio model's ``params`` with its int8 encoder converted by :func:`encoder_weights`
    once, for an engine: its jitted encoder then converts nothing per call (the conversion reads
    every encoder weight). A second copy, 2 bytes an encoder weight; ``params`` itself when its
    encoder is float."""
    if "encoder" not in params or not is_quantized(params["encoder"]):
        return params
    return {**params, "encoder": _encoder_weights(params["encoder"])}


def int8_matmul(
    x_MK: jax.Array,
    w: jax.Array,
    scale_N: jax.Array,
    bias_N: jax.Array | None = None,
    *,
    method: str | None = None,
    out_dtype: Any = None,
    w_layout: str = "KN",
) -> jax.Array:
    """``x @ (w * scale) + bias`` for an int8 ``w`` ([K, N], or [N, K] with ``w_layout="NK"``: a
    tied head's table, contracted in place rather than transposed, or the kernel's packed tiles
    of a [K, N] weight with ``w_layout="tiles"``), per-column ``scale`` [N] and optional ``bias``
    [N] (the kernel adds it to the rounded product as it stores, the other methods after the
    cast); the result in ``out_dtype`` (default ``x``'s). ``method``: see the module doc
    (default :func:`matmul_method`)."""
    method = method or matmul_method()
    out_dtype = out_dtype or x_MK.dtype
    if w_layout == "tiles" and method != "kernel":
        w, w_layout = unpack_tiles(w, x_MK.shape[1], scale_N.shape[0]), "KN"
    if method == "kernel":
        y_MN = int8_kernel_matmul(x_MK, w, scale_N, bias_N, w_layout=w_layout, implementation="kernel")
        return y_MN.astype(out_dtype)
    if method == "dynamic":
        y_MN = int8_dynamic_matmul(x_MK, w, scale_N, w_layout=w_layout).astype(out_dtype)
    elif method == "weight_only":
        dims = (((1,), (0,)), ((), ())) if w_layout == "KN" else (((1,), (1,)), ((), ()))
        acc = jnp.promote_types(out_dtype, x_MK.dtype)
        y_MN = jax.lax.dot_general(x_MK, w.astype(x_MK.dtype), dims, preferred_element_type=acc)
        y_MN = (y_MN * scale_N[None].astype(acc)).astype(out_dtype)
    else:
        raise QuantizationError(f"unknown int8 matmul method {method!r}; known: {', '.join(METHODS)}")
    # Added after the product's cast, as a separate add: XLA:CPU's own paths round as before.
    return y_MN if bias_N is None else y_MN + bias_N[None].astype(y_MN.dtype)


def int8_matmul_reference(x_MK: np.ndarray, w_KN: np.ndarray, scale_N: np.ndarray, method: str) -> np.ndarray:
    """:func:`int8_matmul` in float64 numpy, for kernel checks (CPU and GPU runs alike)."""
    x = np.asarray(x_MK, np.float64)
    w = np.asarray(w_KN, np.float64) * np.asarray(scale_N, np.float64)[None]
    if method in ("kernel", "dynamic"):
        # The codes in float32 with reciprocals, as the kernel and XLA's dot round them.
        x32 = np.asarray(x_MK, np.float32)
        amax = np.abs(x32).max(axis=-1, keepdims=True)
        s = np.where(amax > 0, amax * np.float32(1 / 127), np.float32(1)).astype(np.float32)
        codes = np.clip(np.round(x32 * (np.float32(1) / s)), -127, 127)
        x = codes.astype(np.float64) * s.astype(np.float64)
    elif method != "weight_only":
        raise QuantizationError(f"unknown int8 matmul method {method!r}")
    return x @ w
