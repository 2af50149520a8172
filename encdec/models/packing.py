"""The weights an engine decodes with on CPU: a model's tree with its decode-time weights also
in the layouts the CPU kernels stream fastest.

A decode step reads every decoder weight once, so how a kernel walks the weight's bytes sets
the step's time. Packed once here, when an engine is built:

- int8 (:mod:`encdec.models.quant`): every projection's ``w`` as the int8 kernel's tiles
  (``w_tiles``, :func:`~pallas_kernels.int8_matmul.pack_tiles`), each read in address order
  with its sums in AMX tiles (or VPDPBUSD registers) for all of K; a tied head's table packed the
  same way beside the embedding (``head_tiles``). The encoder's many-row products gain as well.
- float32: the LM head as the float32 decode kernel's panels
  (:func:`~pallas_kernels.decode_matmul.pack_panels`, 32 columns each, contiguous for all of K),
  streamed in address order with the next bytes fetched into L2: a tied head's table beside the
  embedding (``head_panels``), an untied head's ``w`` beside it (``w_panels``). The head is a
  decode step's largest product (bart-base's: 768 x 50265, 18 -> ~22 GB/s against the table
  transposed in rows); the other projections' decode rows gained nothing packed (a call of 1-4 MB
  loses its time elsewhere).

The packed copies are the engine's own: the model keeps its tree for checkpoints, adapters and
other backends, so an engine holds a second copy of what it packs (a byte a weight for int8;
the head for float32). ``ENCDEC_PACK_WEIGHTS=0`` keeps the models' layouts (comparisons).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encdec.config import ModelConfig
from encdec.models.quant import INPUT_DIMS, is_quantized, matmul_method
from encdec.models.transformer import tied_head_owner
from pallas_kernels.decode_matmul import kernel_available as decode_kernel_available
from pallas_kernels.decode_matmul import pack_panels
from pallas_kernels.int8_matmul import pack_tiles

PACK_ENV = "ENCDEC_PACK_WEIGHTS"
"""``0`` keeps an engine's weights in the models' layouts."""


def engine_params(params: Mapping[str, Any], cfg: ModelConfig) -> Mapping[str, Any]:
    """``params`` with its decode-time weights packed for the CPU kernels (see the module doc),
    or ``params`` itself where no kernel reads a packed layout (other backends, int8 through XLA,
    float16 or bfloat16 weights) or ``ENCDEC_PACK_WEIGHTS=0``."""
    if os.environ.get(PACK_ENV) == "0" or jax.default_backend() != "cpu":
        return params
    if is_quantized(params):
        return _int8_tiles(params, cfg) if matmul_method() == "kernel" else params
    if not decode_kernel_available():
        return params
    owner = _head_owner(params, cfg)
    if owner is not None:
        table_VD = params[owner]["embedding_VD"]
        if table_VD.dtype != jnp.float32:
            return params
        return {**params, owner: {**params[owner], "head_panels": _pack_panels(jnp.swapaxes(table_VD, 0, 1))}}
    head = params.get("lm_head")
    if head is None or head["w"].dtype != jnp.float32 or head["w"].ndim != 2:
        return params
    return {**params, "lm_head": {**head, "w_panels": _pack_panels(head["w"])}}


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

    out = walk(params, None)
    owner = _head_owner(params, cfg)
    if owner is not None and "embedding_scale_V" in params[owner]:
        out[owner] = {**out[owner], "head_tiles": _pack(jnp.swapaxes(params[owner]["embedding_VD"], 0, 1))}
    return out


_pack = jax.jit(pack_tiles)
_pack_panels = jax.jit(pack_panels)
