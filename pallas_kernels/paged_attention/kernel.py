"""Pallas (Triton lowering) paged decode attention with flash-decoding splits.

Grid ``(B, N, S)``: one program per slot, head and split. A split owns a contiguous run of the
slot's page table; it walks its keys ``block_k`` at a time, reading each key's page id from the
page table and the key's row from the flattened pool (``[N, T, H]``, ``T = P * G``). Splits past
the slot's length run zero iterations and leave neutral partials, which a small JAX epilogue
merges with a log-sum-exp; with one split the kernel normalizes and writes the output itself.
The grid is explicit rather than a ``vmap`` over slots so that the split axis and the output
layout of the partials stay visible here.

Triton rules kept here (interpret mode checks none of them): every loaded, stored or computed
tensor has a power-of-two size (``block_k``, ``H``; ``api.py`` pads ``H``); no ``dot`` (one query
row per head is far below its 16-row minimum), only elementwise products and reductions; every
address is in bounds (table indices past the table and page ids are clamped, invalid keys read
page 0), and every value loaded for an invalid key is replaced before use, V included.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.paged_attention.reference import MASK_VALUE
from pallas_kernels.t5_bias import relative_position_bucket


@dataclasses.dataclass(frozen=True)
class PagedAttentionBlock:
    """Static tiling of the kernel; hashable, so it can be a jit static argument."""

    pages_per_block: int
    """Pages read per loop step; ``pages_per_block * G`` (``block_k``) must be a power of two."""
    num_splits: int = 1
    """Flash-decoding splits of each slot's page table; each is a separate program."""
    num_warps: int = 4
    """Triton warps per program."""
    num_stages: int = 2
    """Triton pipelining stages; Triton 3.x pipelines only loads that feed a dot, so little effect."""


def _decode_kernel(
    lengths_ref,
    q_ref,
    k_ref,
    v_ref,
    table_ref,
    *rest,
    block_k: int,
    keys_per_split: int,
    page_size: int,
    num_pages: int,
    table_width: int,
    scale: float,
    max_distance: int,
    num_buckets: int | None,
):
    """One (slot, head, split): its keys' softmax numerator, max and sum.

    With a single split (``rest`` ends in just the output) it writes the normalized output;
    otherwise the partials, for ``_merge_splits``.
    """
    bias_ref = None if num_buckets is None else rest[0]
    out_refs = rest if num_buckets is None else rest[1:]
    length = jnp.clip(lengths_ref[0], 0, table_width * page_size)
    split_start = pl.program_id(2) * keys_per_split
    num_keys = jnp.clip(length - split_start, 0, keys_per_split)
    num_blocks = lax.div(num_keys + (block_k - 1), block_k)
    q_H = q_ref[...].astype(jnp.float32) * jnp.float32(scale)

    def body(i, carry):
        acc_H, m, l = carry
        key_K = split_start + i * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        valid_K = key_K < length
        # Keys past the table (the last block's tail) are invalid: clamp their table index.
        # Page ids are clamped like XLA's gather does, so a bad id cannot fault.
        slot_page_K = jnp.minimum(lax.div(key_K, page_size), table_width - 1)
        page_K = jnp.clip(table_ref[slot_page_K], 0, num_pages - 1)
        page_K = jnp.where(valid_K, page_K, 0)
        row_K = page_K * page_size + lax.rem(key_K, page_size)
        valid_K1 = valid_K[:, None]
        k_KH = jnp.where(valid_K1, k_ref[row_K, :].astype(jnp.float32), 0.0)
        logits_K = jnp.sum(q_H[None, :] * k_KH, axis=1)
        if bias_ref is not None:
            bucket_K = relative_position_bucket(
                key_K - (length - 1),
                bidirectional=False,
                num_buckets=num_buckets,
                max_distance=max_distance,
            )
            logits_K = logits_K + bias_ref[bucket_K].astype(jnp.float32)
        logits_K = jnp.where(valid_K, logits_K, MASK_VALUE)
        m_next = jnp.maximum(m, jnp.max(logits_K))
        correction = jnp.exp(m - m_next)
        p_K = jnp.where(valid_K, jnp.exp(logits_K - m_next), 0.0)
        v_KH = jnp.where(valid_K1, v_ref[row_K, :].astype(jnp.float32), 0.0)
        acc_H = acc_H * correction + jnp.sum(p_K[:, None] * v_KH, axis=0)
        return acc_H, m_next, l * correction + jnp.sum(p_K)

    init = (jnp.zeros_like(q_H), jnp.float32(MASK_VALUE), jnp.float32(0.0))
    acc_H, m, l = lax.fori_loop(0, num_blocks, body, init)
    if len(out_refs) == 1:
        (o_ref,) = out_refs
        o_ref[...] = (acc_H / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc_H
        m_ref[...] = m
        l_ref[...] = l


def _merge_splits(o_SBNH: jax.Array, m_SBN: jax.Array, l_SBN: jax.Array) -> jax.Array:
    """Log-sum-exp merge of the splits' partials; a slot with no keys gets exact zeros."""
    m_BN = jnp.max(m_SBN, axis=0)
    w_SBN = jnp.exp(m_SBN - m_BN[None])
    l_BN = jnp.sum(w_SBN * l_SBN, axis=0)
    o_BNH = jnp.sum(w_SBN[..., None] * o_SBNH, axis=0)
    return o_BNH / jnp.where(l_BN > 0, l_BN, 1.0)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("scale", "max_distance", "page_size", "block", "interpret", "head_offset"),
)
def paged_attention_kernel(
    q_BNH: jax.Array,
    k_NTH: jax.Array,
    v_NTH: jax.Array,
    page_table_BM: jax.Array,
    lengths_B: jax.Array,
    bias_NR: jax.Array | None,
    *,
    scale: float,
    max_distance: int,
    page_size: int,
    block: PagedAttentionBlock,
    interpret: bool,
    head_offset: int = 0,
) -> jax.Array:
    """Kernel entry on validated, Triton-friendly operands (see ``api.paged_attention``).

    ``H`` and ``block.pages_per_block * page_size`` must be powers of two; lengths are clamped
    to ``[0, M * page_size]``. Head ``n`` reads pool row ``head_offset + n`` (stacked layers).
    """
    B, N, H = q_BNH.shape
    _, T, _ = k_NTH.shape
    _, M = page_table_BM.shape
    S = block.num_splits
    block_k = block.pages_per_block * page_size
    blocks_per_split = pl.cdiv(pl.cdiv(M, block.pages_per_block), S)
    num_buckets = None if bias_NR is None else bias_NR.shape[1]

    kernel = functools.partial(
        _decode_kernel,
        block_k=block_k,
        keys_per_split=blocks_per_split * block_k,
        page_size=page_size,
        num_pages=T // page_size,
        table_width=M,
        scale=scale,
        max_distance=max_distance,
        num_buckets=num_buckets,
    )
    in_specs = [
        pl.BlockSpec((None, 1), lambda b, n, s: (b, 0)),
        pl.BlockSpec((None, None, H), lambda b, n, s: (b, n, 0)),
        pl.BlockSpec((None, T, H), lambda b, n, s: (n + head_offset, 0, 0)),
        pl.BlockSpec((None, T, H), lambda b, n, s: (n + head_offset, 0, 0)),
        pl.BlockSpec((None, M), lambda b, n, s: (b, 0)),
    ]
    operands = [lengths_B[:, None], q_BNH, k_NTH, v_NTH, page_table_BM]
    if bias_NR is not None:
        in_specs.append(pl.BlockSpec((None, num_buckets), lambda b, n, s: (n, 0)))
        operands.append(bias_NR)
    if S == 1:
        # One split: the kernel normalizes and writes q's dtype, no epilogue.
        out_specs = pl.BlockSpec((None, None, H), lambda b, n, s: (b, n, 0))
        out_shape = jax.ShapeDtypeStruct((B, N, H), q_BNH.dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, H), lambda b, n, s: (s, b, n, 0)),
            pl.BlockSpec((None, None, None), lambda b, n, s: (s, b, n)),
            pl.BlockSpec((None, None, None), lambda b, n, s: (s, b, n)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((S, B, N, H), jnp.float32),
            jax.ShapeDtypeStruct((S, B, N), jnp.float32),
            jax.ShapeDtypeStruct((S, B, N), jnp.float32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=(B, N, S),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_bk{block_k}_s{S}",
    )(*operands)
    if S == 1:
        return out
    return _merge_splits(*out).astype(q_BNH.dtype)
