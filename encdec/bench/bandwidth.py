"""Memory bandwidth, and the decode step's floor: ``weight bytes per step / bandwidth``.

Decode reads every decoder weight once a step, so no step can be faster than that many bytes
at the machine's read bandwidth; the bench prints this floor beside the step time it measured,
and beside it the floor with the K/V cache the step's attention reads as well.
The probe is STREAM-like: a jitted sum over an array far larger than the caches (reads only,
as a decode step's weights are), plus numpy's copy for reference; best of a few passes. The
array lies in 2 MB pages where an engine's packed weights do (:mod:`encdec.models.huge_pages`):
the floor is what the machine streams at its best. In XLA's 4 KB pages the same sum read 25-27
GB/s where it read ~31 in 2 MB pages; both are recorded with the machine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from encdec.models.huge_pages import to_huge_pages
from encdec.models.transformer import tied_head_owner

PROBE_BYTES = 256 << 20
"""Bytes the probe streams per pass: well beyond any L3 here."""


def fastest_s(fn, repeats: int) -> float:
    """Seconds of ``fn``'s fastest call of ``repeats``, after one untimed call (compiles, first
    touches)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


_total = jax.jit(jnp.sum)
"""The probe's read, compiled once per size (the bench probes beside every row's step)."""


def measure_bandwidth(
    nbytes: int = PROBE_BYTES, repeats: int = 7, *, numpy_copy: bool = True
) -> dict[str, float]:
    """Read bandwidth in GB/s (1e9 bytes): ``jax_read`` (a jitted sum, what XLA's loops reach,
    over an array in 2 MB pages where :func:`~encdec.models.huge_pages.huge_pages_usable`) and,
    with ``numpy_copy``, ``jax_read_4k`` (the same sum over XLA's own buffer) and ``numpy_copy``
    (bytes read plus bytes written over the time of ``np.copyto``)."""
    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    probe = to_huge_pages([x])[0]
    t_read = fastest_s(lambda: _total(probe).block_until_ready(), repeats)
    out = {"jax_read_GBps": nbytes / t_read / 1e9}
    if not numpy_copy:
        return out
    out["jax_read_4k_GBps"] = nbytes / fastest_s(lambda: _total(x).block_until_ready(), repeats) / 1e9
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    out["numpy_copy_GBps"] = 2 * nbytes / fastest_s(lambda: np.copyto(b, a), repeats) / 1e9
    return out


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def decode_weight_bytes(params: Mapping[str, Any], cfg) -> int:
    """Bytes of the weights one decode step reads: every decoder layer's projections and norms
    except the cross-attention K and V (projected once per request, at encoding), the LM head
    (the embedding table when tied) and BART's logits bias. Embedding rows and position tables
    are gathered a row per slot: left out."""
    dec = params["decoder"]
    total = 0
    for layer in dec["layers"]:
        for name, sub in layer.items():
            if name == "cross_attn":
                total += _nbytes({k: v for k, v in sub.items() if k not in ("k", "v")})
            else:
                total += _nbytes(sub)
    for name in ("final_norm", "rel_bias_NR"):
        if name in dec:
            total += _nbytes(dec[name])
    if cfg.tie_word_embeddings:
        owner = params[tied_head_owner(params)]
        total += _nbytes({k: owner[k] for k in ("embedding_VD", "embedding_scale_V") if k in owner})
    else:
        total += _nbytes(params["lm_head"])
    if "final_logits_bias_V" in params:
        total += _nbytes(params["final_logits_bias_V"])
    return total


def decode_kv_bytes(cfg, itemsize: int, input_lens: list[int], output_lens: list[int]) -> float:
    """Mean bytes of K/V one decode step's attention must read when ``len(input_lens)`` requests
    start together and each decodes ``output_lens`` tokens: at step ``t`` a request attends over
    its ``input_len`` cross positions and ``t + 1`` self positions, in every decoder layer. The
    cache is not in the weights' floor, and at decode shapes it can weigh as much."""
    per_position = cfg.decoder_layers * 2 * cfg.decoder_heads * cfg.head_dim * itemsize
    steps = max(output_lens, default=0)
    if not steps:
        return 0.0
    positions = sum(n * s + n * (n + 1) // 2 for s, n in zip(input_lens, output_lens, strict=True))
    return positions * per_position / steps


def floor_ms(weight_bytes: int, bandwidth_GBps: float) -> float:
    """The step's floor in milliseconds: its weight bytes at ``bandwidth_GBps``."""
    return weight_bytes / (bandwidth_GBps * 1e9) * 1e3
