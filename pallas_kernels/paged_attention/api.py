"""``paged_attention``: one entry point, Pallas on GPU and the XLA reference elsewhere."""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.kernel import PagedAttentionBlock, paged_attention_kernel
from pallas_kernels.paged_attention.reference import paged_attention_reference

_IMPLEMENTATIONS = ("auto", "pallas", "xla")
# Keys held by one loop step: 128 rows of H=64 keep K and V tiles in registers at 4 warps.
_BLOCK_ELEMENTS = 128 * 64
# Enough programs to give every SM of an H100/H200 (132) two of them.
_DEFAULT_SM_COUNT = 132


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_power_of_2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _sm_count() -> int:
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or _DEFAULT_SM_COUNT)


def default_block(B: int, N: int, H: int, M: int, G: int) -> PagedAttentionBlock:
    """Tiling for these shapes: ~``_BLOCK_ELEMENTS`` K values a step, splits to fill the GPU."""
    block_k = max(G, min(_BLOCK_ELEMENTS // _next_power_of_2(H), _next_power_of_2(M * G)))
    pages_per_block = max(1, block_k // G)
    num_blocks = -(-M // pages_per_block)
    num_splits = max(1, min(num_blocks, -(-2 * _sm_count() // (B * N))))
    # Drop splits that would own no block at all.
    num_splits = -(-num_blocks // -(-num_blocks // num_splits))
    return PagedAttentionBlock(pages_per_block=pages_per_block, num_splits=num_splits)


def _resolve_implementation(implementation: str) -> str:
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return implementation


def _check_shapes(q_BNH, k_pages_NPGH, v_pages_NPGH, page_table_BM, lengths_B, bias_NR, stacked_layers=1):
    B, N, H = q_BNH.shape
    if k_pages_NPGH.shape != v_pages_NPGH.shape:
        raise ValueError(f"K and V pools differ: {k_pages_NPGH.shape} vs {v_pages_NPGH.shape}")
    if k_pages_NPGH.ndim != 4 or k_pages_NPGH.shape[0] != N * stacked_layers or k_pages_NPGH.shape[3] != H:
        raise ValueError(f"pool {k_pages_NPGH.shape} does not match q {q_BNH.shape} as [N, P, G, H]")
    if page_table_BM.ndim != 2 or page_table_BM.shape[0] != B:
        raise ValueError(f"page table {page_table_BM.shape} is not [B={B}, M]")
    if lengths_B.shape != (B,):
        raise ValueError(f"lengths {lengths_B.shape} is not [B={B}]")
    if bias_NR is not None and (bias_NR.ndim != 2 or bias_NR.shape[0] != N):
        raise ValueError(f"bias {bias_NR.shape} is not [N={N}, R]")


@functools.partial(
    jax.jit, static_argnames=("scale", "max_distance", "implementation", "block", "interpret", "layer")
)
def paged_attention(
    q_BNH: jax.Array,
    k_pages_NPGH: jax.Array,
    v_pages_NPGH: jax.Array,
    page_table_BM: jax.Array,
    lengths_B: jax.Array,
    *,
    scale: float = 1.0,
    bias_NR: jax.Array | None = None,
    max_distance: int = 128,
    implementation: str = "auto",
    block: PagedAttentionBlock | None = None,
    interpret: bool = False,
    layer: int | None = None,
) -> jax.Array:
    """Decode attention of one query per slot over that slot's paged keys.

    Slot ``b`` has keys ``k = 0 .. lengths[b] - 1``, stored at page ``page_table[b, k // G]``, row
    ``k % G`` of each head's pool; table entries past the slot's last page are ignored (they must
    be valid page ids; 0 is the sentinel). Its query sits at ``lengths[b] - 1`` (decoder
    self-attention; cross-attention passes the encoder lengths and no bias). Logits are
    ``scale * q.k`` plus, if ``bias_NR`` is given, T5's decoder bias
    ``bias_NR[n, bucket(k - q_pos)]`` with ``bias_NR.shape[1]`` buckets. Softmax and accumulation
    run in float32; the result has ``q``'s dtype, and a slot of length 0 gets zeros.

    ``implementation``: ``"pallas"`` (the Triton kernel; ``interpret=True`` runs it on CPU),
    ``"xla"`` (the gather reference) or ``"auto"`` (Pallas on GPU, else XLA). ``block``
    overrides the tiling that ``default_block`` picks from the shapes.

    ``layer``: the pools are every layer's, stacked ``[L, N, P, G, H]``, and this call reads
    layer ``layer``. The kernel then indexes the stack in place: slicing one layer out first
    would copy that layer's whole pool on every call.
    """
    head_offset, stacked_layers = 0, 1
    if layer is not None:
        if k_pages_NPGH.ndim != 5:
            raise ValueError(f"with layer=, pools must be stacked [L, N, P, G, H]; got {k_pages_NPGH.shape}")
        L, N_pool = k_pages_NPGH.shape[:2]
        if not 0 <= layer < L:
            raise ValueError(f"layer {layer} is outside the stacked pools' {L} layers")
        padded_heads = _next_power_of_2(q_BNH.shape[2]) != q_BNH.shape[2]
        if _resolve_implementation(implementation) == "xla" or padded_heads:
            k_pages_NPGH, v_pages_NPGH = k_pages_NPGH[layer], v_pages_NPGH[layer]
        else:
            head_offset, stacked_layers = layer * N_pool, L
            k_pages_NPGH = k_pages_NPGH.reshape(L * N_pool, *k_pages_NPGH.shape[2:])
            v_pages_NPGH = v_pages_NPGH.reshape(L * N_pool, *v_pages_NPGH.shape[2:])
    _check_shapes(q_BNH, k_pages_NPGH, v_pages_NPGH, page_table_BM, lengths_B, bias_NR, stacked_layers)
    lengths_B = lengths_B.astype(jnp.int32)
    page_table_BM = page_table_BM.astype(jnp.int32)
    if _resolve_implementation(implementation) == "xla":
        return paged_attention_reference(
            q_BNH,
            k_pages_NPGH,
            v_pages_NPGH,
            page_table_BM,
            lengths_B,
            scale=scale,
            bias_NR=bias_NR,
            max_distance=max_distance,
        )

    B, N, H = q_BNH.shape
    NL, P, G, _ = k_pages_NPGH.shape
    M = page_table_BM.shape[1]
    if block is None:
        block = default_block(B, N, H, M, G)
    if not _is_power_of_2(block.pages_per_block * G):
        raise ValueError(
            f"pages_per_block * page size = {block.pages_per_block} * {G} must be a power of two"
        )
    # Zero columns leave q.k unchanged and give zero output columns, sliced off below. This
    # copies the pools, so it is for toy head sizes only; real models have H = 64 or 128.
    H_pad = _next_power_of_2(H)
    if H_pad != H:
        pad = [(0, 0)] * 3 + [(0, H_pad - H)]
        q_BNH = jnp.pad(q_BNH, pad[1:])
        k_pages_NPGH = jnp.pad(k_pages_NPGH, pad)
        v_pages_NPGH = jnp.pad(v_pages_NPGH, pad)
    out_BNH = paged_attention_kernel(
        q_BNH,
        k_pages_NPGH.reshape(NL, P * G, H_pad),
        v_pages_NPGH.reshape(NL, P * G, H_pad),
        page_table_BM,
        lengths_B,
        bias_NR,
        scale=float(scale),
        max_distance=max_distance,
        page_size=G,
        block=block,
        interpret=interpret,
        head_offset=head_offset,
    )
    return out_BNH[..., :H]
