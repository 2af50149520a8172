"""The weights an engine decodes with on CPU: a model's tree with its decode-time weights also
in the layouts the CPU kernels stream fastest.

A decode step reads every decoder weight once, so how a kernel walks the weight's bytes sets
the step's time. Packed once here, when an engine is built:

- int8 (:mod:`encdec.models.quant`): every projection's ``w`` as the int8 kernel's tiles
  (``w_tiles``, :func:`~pallas_kernels.int8_matmul.pack_tiles`), each read in address order
  with its sums in AMX tiles (or VPDPBUSD registers) for all of K; a tied head's table packed the
  same way beside the embedding (``head_tiles``). A text encoder's many-row products gain as
  well; an audio encoder multiplies in bfloat16 (:func:`~encdec.models.quant.encoder_weights`).
- float32 (decode steps of at most 16 rows, the kernel's): every projection a decode step reads
  (a decoder layer's self-attention, cross-attention query and output, FFN; an untied head) as
  the float32 decode kernel's panels beside its ``w`` (``w_panels``,
  :func:`~pallas_kernels.decode_matmul.pack_panels`: 32 columns each, contiguous for all of K),
  streamed in address order with the next bytes fetched into L2; a tied head's table the same
  way beside the embedding (``head_panels``). ``w`` serves more rows. bart-base's float32 step
  at 8 slots, alternated: 21.0-21.6 ms with its head alone packed, 17.5-17.9 with every
  decode-time projection (768 x 768 products read at ~16 GB/s in place, ~19 as panels).

The packed copies live in memory advised for 2 MB pages (:mod:`encdec.models.huge_pages`): the
stream then misses the TLB every 2 MB instead of every 4 KB.

The packed copies are the engine's own: the model keeps its tree for checkpoints, adapters and
other backends, so an engine holds a second copy of what it packs (a byte a weight for int8;
for float32, the decoder's decode-time projections and the head: bart-base's 198 MB and 154 MB).
``ENCDEC_PACK_WEIGHTS=0`` keeps the models' layouts (comparisons).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encdec.config import ModelConfig
from encdec.models.huge_pages import to_huge_pages
from encdec.models.layers import DECODE_MATMUL_ENV
from encdec.models.quant import INPUT_DIMS, is_quantized, matmul_method
from encdec.models.transformer import tied_head_owner
from pallas_kernels.decode_matmul import MAX_ROWS, pack_panels
from pallas_kernels.decode_matmul import kernel_available as decode_kernel_available
from pallas_kernels.int8_matmul import pack_tiles

PACK_ENV = "ENCDEC_PACK_WEIGHTS"
"""``0`` keeps an engine's weights in the models' layouts."""

DECODE_PROJECTIONS = {
    "attn": ("q", "k", "v", "o"),
    "cross_attn": ("q", "o"),
    "ffn": ("wi", "wi_0", "wi_1", "wo"),
}
"""A decoder layer's projections that every decode step reads, by block. The cross-attention's
``k`` and ``v`` project the encoder's states once, at admission, over many rows: never packed."""


def engine_params(
    params: Mapping[str, Any], cfg: ModelConfig, *, decode_rows: int = MAX_ROWS
) -> Mapping[str, Any]:
    """``params`` with its decode-time weights packed for the CPU kernels (see the module doc),
    or ``params`` itself where no kernel reads a packed layout (other backends, int8 through XLA,
    float16 or bfloat16 weights, float32 decode steps of more than 16 rows, ``decode_rows``)
    or ``ENCDEC_PACK_WEIGHTS=0``."""
    if os.environ.get(PACK_ENV) == "0" or jax.default_backend() != "cpu":
        return params
    if is_quantized(params):
        return _in_huge_pages(_int8_tiles(params, cfg)) if matmul_method() == "kernel" else params
    if decode_rows > MAX_ROWS or os.environ.get(DECODE_MATMUL_ENV) == "xla" or not decode_kernel_available():
        return params
    return _in_huge_pages(_float32_panels(params, cfg))


PACKED_LEAVES = ("w_panels", "head_panels", "w_tiles", "head_tiles")
"""The packed copies :func:`engine_params` adds, which every decode step streams."""


def _in_huge_pages(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """``params`` with its packed leaves moved to huge-page memory
    (:func:`~encdec.models.huge_pages.to_huge_pages`: a float32 step ~4% faster); every subtree
    without one is the same object as before."""
    found = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[-1], "key", None) in PACKED_LEAVES
    ]
    moved = {id(a): b for a, b in zip(found, to_huge_pages(found), strict=True) if a is not b}

    def swap(node: Any) -> Any:
        if isinstance(node, Mapping):
            out = {k: swap(v) for k, v in node.items()}
            return node if all(out[k] is node[k] for k in node) else out
        if isinstance(node, (list, tuple)):
            items = [swap(v) for v in node]
            return node if all(a is b for a, b in zip(items, node, strict=True)) else type(node)(items)
        return moved.get(id(node), node)

    return swap(params) if moved else params


def _float32_panels(params: Mapping[str, Any], cfg: ModelConfig) -> Mapping[str, Any]:
    """The decoder's decode-time projections and the head as panels; ``params`` itself when the
    head is not float32 (the model's dtype: bfloat16 and float16 models are not packed)."""
    owner = _head_owner(params, cfg)
    head_w = params[owner]["embedding_VD"] if owner is not None else params.get("lm_head", {}).get("w")
    if head_w is None or head_w.dtype != jnp.float32:
        return params
    dec = params["decoder"]
    layers = type(dec["layers"])(_panel_layer(layer) for layer in dec["layers"])
    out = {**params, "decoder": {**dec, "layers": layers}}
    if owner is not None:
        out[owner] = {**params[owner], "head_panels": _pack_panels(jnp.swapaxes(head_w, 0, 1))}
    else:
        out["lm_head"] = _panel_node(params["lm_head"], "lm_head")
    return out


def _panel_layer(layer: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(layer)
    for block, names in DECODE_PROJECTIONS.items():
        if block in layer:
            out[block] = {k: _panel_node(v, k) if k in names else v for k, v in layer[block].items()}
    return out


def _panel_node(node: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A float32 projection with its ``w``'s panels beside it; another dtype as it is."""
    w = node["w"]
    if w.dtype != jnp.float32:
        return node
    K = math.prod(w.shape[: INPUT_DIMS[name]])
    return {**node, "w_panels": _pack_panels(w.reshape(K, -1))}


def _head_owner(params: Mapping[str, Any], cfg: ModelConfig) -> str | None:
    """Where a tied head's table lives, or None for an untied head."""
    return tied_head_owner(params) if cfg.tie_word_embeddings else None


def _int8_tiles(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    def walk(node: Any, name: str | None) -> Any:
        if isinstance(node, Mapping):
            w = node.get("w")
            if "w_scale" in node and getattr(w, "dtype", None) == jnp.int8 and name in INPUT_DIMS:
                size = int(np.prod(w.shape[: INPUT_DIMS[name]]))
                out = {k: v for k, v in node.items() if k != "w"}
                out["w_tiles"] = _pack(w.reshape(size, -1))
                return out
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, name) for v in node)
        return node

    # An audio encoder multiplies in bfloat16 (encdec.models.quant.encoder_weights): no tiles.
    out = {k: v if k == "encoder" and cfg.is_audio else walk(v, k) for k, v in params.items()}
    owner = _head_owner(params, cfg)
    if owner is not None and "embedding_scale_V" in params[owner]:
        out[owner] = {**out[owner], "head_tiles": _pack(jnp.swapaxes(params[owner]["embedding_VD"], 0, 1))}
    return out


_pack = jax.jit(pack_tiles)
_pack_panels = jax.jit(pack_panels)
