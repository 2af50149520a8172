"""Device page pools for every decoder layer, their sizing, and the page writes.

Two pools (the *dual* paged cache): self-attention pages grow one token per decode step;
cross-attention pages are written once from the encoder output and read every step. Each is
a K and a V array ``[L, N, P, G, H]`` (letter key in :mod:`encdec.models`); page
``SENTINEL_PAGE`` (0) of each pool is never handed out by the allocator.

The writes are pure functions meant to run inside the engine's jitted steps with the pools
donated. Each is a single ``lax.scatter`` with ``unique_indices=True`` and out-of-range
indices dropped, which XLA performs in place on a donated buffer. Writes addressed to the
sentinel page are redirected out of range and dropped: the sentinel stays all zeros, and
the remaining indices stay unique (callers guarantee that no two written rows share a page
slot, which holds whenever each page has one writer).

Keep pools float32 on XLA:CPU: a scatter into a bfloat16 buffer converts the whole buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from encdec.cache.allocator import SENTINEL_PAGE
from encdec.config import ModelConfig
from pallas_kernels.put_rows import put_rows

_DROP = jax.lax.GatherScatterMode.FILL_OR_DROP


def bytes_per_token_per_layer(cfg: ModelConfig, dtype: Any) -> int:
    """Bytes one token takes in one layer of one pool: K and V, ``2 * N * H * itemsize``."""
    return 2 * cfg.decoder_heads * cfg.head_dim * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Shapes of the two page pools (hashable: usable as a jit static argument).

    Build it with :meth:`from_budget` (a memory budget split by ``cross_kv_fraction``) or
    :meth:`from_pages` (explicit page counts). Page counts include the sentinel page.
    """

    num_layers: int
    """Decoder layers (L)."""
    num_heads: int
    """Decoder heads (N); cross K/V are projected with these too."""
    head_dim: int
    """Per-head width (H)."""
    page_size: int
    """Tokens per page (G)."""
    num_self_pages: int
    """Pages in the self-attention pool (P), sentinel included."""
    num_cross_pages: int
    """Pages in the cross-attention pool (P), sentinel included."""
    dtype: Any = np.dtype(np.float32)
    """Storage dtype of both pools (float32 on CPU; bfloat16 is fine on GPU)."""

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        for name in ("num_layers", "num_heads", "head_dim", "page_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PoolConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("num_self_pages", "num_cross_pages"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"PoolConfig.{name}={getattr(self, name)}: "
                    "a pool needs the sentinel page plus at least one more"
                )

    @classmethod
    def from_pages(
        cls,
        cfg: ModelConfig,
        *,
        page_size: int,
        num_self_pages: int,
        num_cross_pages: int,
        dtype: Any = np.float32,
    ) -> PoolConfig:
        return cls(
            num_layers=cfg.decoder_layers,
            num_heads=cfg.decoder_heads,
            head_dim=cfg.head_dim,
            page_size=page_size,
            num_self_pages=num_self_pages,
            num_cross_pages=num_cross_pages,
            dtype=dtype,
        )

    @classmethod
    def from_budget(
        cls,
        cfg: ModelConfig,
        *,
        memory_bytes: int,
        page_size: int,
        cross_kv_fraction: float = 0.5,
        dtype: Any = np.float32,
    ) -> PoolConfig:
        """As many pages as fit in ``memory_bytes``, ``cross_kv_fraction`` of it for cross pages.

        Like TensorRT-LLM's ``cross_kv_cache_fraction``. Raises ``ValueError`` if either pool
        would get fewer than two pages (the sentinel and one usable page).
        """
        if not 0.0 < cross_kv_fraction < 1.0:
            raise ValueError(f"cross_kv_fraction must be in (0, 1), got {cross_kv_fraction}")
        page_bytes = cfg.decoder_layers * page_size * bytes_per_token_per_layer(cfg, dtype)
        cross_bytes = int(memory_bytes * cross_kv_fraction)
        num_cross = cross_bytes // page_bytes
        num_self = (memory_bytes - cross_bytes) // page_bytes
        if min(num_self, num_cross) < 2:
            raise ValueError(
                f"a budget of {memory_bytes} bytes gives {num_self} self and {num_cross} cross pages of "
                f"{page_bytes} bytes (cross_kv_fraction={cross_kv_fraction}); each pool needs at least 2"
            )
        return cls.from_pages(
            cfg, page_size=page_size, num_self_pages=num_self, num_cross_pages=num_cross, dtype=dtype
        )

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        return 2 * self.num_layers * self.num_heads * self.page_size * self.head_dim * self.dtype.itemsize

    def self_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.num_heads, self.num_self_pages, self.page_size, self.head_dim)

    def cross_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.num_heads, self.num_cross_pages, self.page_size, self.head_dim)


def pool_bytes(pool_cfg: PoolConfig) -> dict[str, int]:
    """Device bytes the pools of ``pool_cfg`` take: ``self``, ``cross`` and ``total``."""
    self_bytes = pool_cfg.num_self_pages * pool_cfg.page_bytes
    cross_bytes = pool_cfg.num_cross_pages * pool_cfg.page_bytes
    return {"self": self_bytes, "cross": cross_bytes, "total": self_bytes + cross_bytes}


@flax.struct.dataclass
class PagePools:
    """K and V page pools of every decoder layer, for self- and cross-attention."""

    self_k_LNPGH: jax.Array
    self_v_LNPGH: jax.Array
    cross_k_LNPGH: jax.Array
    cross_v_LNPGH: jax.Array

    @property
    def page_size(self) -> int:
        return self.self_k_LNPGH.shape[3]

    @property
    def num_self_pages(self) -> int:
        return self.self_k_LNPGH.shape[2]

    @property
    def num_cross_pages(self) -> int:
        return self.cross_k_LNPGH.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the four arrays."""
        return sum(
            x.nbytes for x in (self.self_k_LNPGH, self.self_v_LNPGH, self.cross_k_LNPGH, self.cross_v_LNPGH)
        )


def init_pools(pool_cfg: PoolConfig) -> PagePools:
    """Zeroed pools on the default device."""
    return PagePools(
        self_k_LNPGH=jnp.zeros(pool_cfg.self_shape(), pool_cfg.dtype),
        self_v_LNPGH=jnp.zeros(pool_cfg.self_shape(), pool_cfg.dtype),
        cross_k_LNPGH=jnp.zeros(pool_cfg.cross_shape(), pool_cfg.dtype),
        cross_v_LNPGH=jnp.zeros(pool_cfg.cross_shape(), pool_cfg.dtype),
    )


def _drop_sentinel(page_ids: jax.Array, num_pages: int) -> jax.Array:
    """Send sentinel-page writes out of range, where the scatter drops them."""
    page_ids = page_ids.astype(jnp.int32)
    return jnp.where(page_ids == SENTINEL_PAGE, jnp.int32(num_pages), page_ids)


def _scatter_rows(
    pool: jax.Array, index_dims: tuple[int, ...], indices_BI: jax.Array, rows: jax.Array
) -> jax.Array:
    """Write ``rows[b]`` (the operand's remaining dims) at ``indices_BI[b]`` along ``index_dims``."""
    window_dims = tuple(d for d in range(pool.ndim) if d not in index_dims)
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(1, 1 + len(window_dims))),
        inserted_window_dims=index_dims,
        scatter_dims_to_operand_dims=index_dims,
    )
    return jax.lax.scatter(pool, indices_BI, rows.astype(pool.dtype), dnums, unique_indices=True, mode=_DROP)


def write_rows(k_NPGH: jax.Array, page_ids_B: jax.Array, offsets_B: jax.Array, k_BNH: jax.Array) -> jax.Array:
    """Store ``k_BNH[b]`` at row ``offsets_B[b]`` of page ``page_ids_B[b]`` (page 0: dropped)."""
    page_B = _drop_sentinel(page_ids_B, k_NPGH.shape[1])
    indices_B2 = jnp.stack([page_B, offsets_B.astype(jnp.int32)], axis=-1)
    return _scatter_rows(k_NPGH, (1, 2), indices_B2, k_BNH)


def write_layer_rows(
    k_LNPGH: jax.Array,
    layer: int | jax.Array,
    page_ids_B: jax.Array,
    offsets_B: jax.Array,
    k_BNH: jax.Array,
    *,
    implementation: str = "auto",
) -> jax.Array:
    """:func:`write_rows` into one layer of a stacked pool, in place: through the row writer's
    CPU kernel (``"auto"`` on CPU: a step's 2 x layers scatters of a few KB each cost XLA:CPU
    15-40 us apiece) or one XLA scatter on the whole pool (``"xla"``: a step that reads the pool
    after writing it, as PagedKV's does, keeps XLA's scatter, which XLA orders in place where an
    aliased custom call got a copy of the pool)."""
    P, G = k_LNPGH.shape[2:4]
    row_B = _drop_sentinel(page_ids_B, P) * G + offsets_B.astype(jnp.int32)  # page P: past the end
    return put_rows(k_LNPGH, k_BNH, jnp.full_like(row_B, layer), row_B, implementation=implementation)


def _page_ids_for_lengths(page_table_BM: jax.Array, lengths_B: jax.Array, page_size: int) -> jax.Array:
    """The page table with entries past each row's last page set to the sentinel."""
    M = page_table_BM.shape[1]
    used_B1 = (lengths_B.astype(jnp.int32)[:, None] + page_size - 1) // page_size
    return jnp.where(jnp.arange(M, dtype=jnp.int32)[None, :] < used_B1, page_table_BM, SENTINEL_PAGE)


def _pad_to_pages(k_BS_: jax.Array, M: int, G: int) -> jax.Array:
    S = k_BS_.shape[1]
    if S > M * G:
        raise ValueError(f"{S} source positions do not fit a page table of {M} pages of {G}")
    pad = [(0, 0)] * k_BS_.ndim
    pad[1] = (0, M * G - S)
    return jnp.pad(k_BS_, pad)


def write_pages(
    k_NPGH: jax.Array, page_table_BM: jax.Array, k_BSNH: jax.Array, lengths_B: jax.Array
) -> jax.Array:
    """Write each row's first ``lengths_B[b]`` positions of ``k_BSNH`` as whole pages.

    Position ``s`` goes to page ``page_table_BM[b, s // G]``, row ``s % G``; ``S`` is padded up
    to ``M * G``. Pages past a row's length are not written (the sentinel), so a row of length
    0 writes nothing. The tail of a row's last page holds whatever ``k_BSNH`` has there
    (padding): attention masks it by length.
    """
    B, M = page_table_BM.shape
    N, P, G, H = k_NPGH.shape
    k_BMGNH = _pad_to_pages(k_BSNH, M, G).reshape(B, M, G, N, H)
    pages_BM = _drop_sentinel(_page_ids_for_lengths(page_table_BM, lengths_B, G), P)
    updates_XNGH = jnp.moveaxis(k_BMGNH, 3, 2).reshape(B * M, N, G, H)
    return _scatter_rows(k_NPGH, (1,), pages_BM.reshape(B * M, 1), updates_XNGH)


def write_layer_pages(
    k_LNPGH: jax.Array, page_table_BM: jax.Array, k_LBSNH: jax.Array, lengths_B: jax.Array
) -> jax.Array:
    """:func:`write_pages` for every layer at once, as one scatter on the stacked pool."""
    B, M = page_table_BM.shape
    L, N, P, G, H = k_LNPGH.shape
    k_BSLNH = jnp.transpose(k_LBSNH, (1, 2, 0, 3, 4))
    k_BMGLNH = _pad_to_pages(k_BSLNH, M, G).reshape(B, M, G, L, N, H)
    pages_BM = _drop_sentinel(_page_ids_for_lengths(page_table_BM, lengths_B, G), P)
    # [B, M, G, L, N, H] -> [B*M, L, N, G, H]: one update window per page.
    updates_XLNGH = jnp.transpose(k_BMGLNH, (0, 1, 3, 4, 2, 5)).reshape(B * M, L, N, G, H)
    return _scatter_rows(k_LNPGH, (2,), pages_BM.reshape(B * M, 1), updates_XLNGH)


def copy_layer_pages(k_LNPGH: jax.Array, src_X: jax.Array, dst_X: jax.Array) -> jax.Array:
    """Copy page ``src_X[x]`` onto page ``dst_X[x]`` in every layer (a beam's partially filled
    last page, copy-on-write); a sentinel ``dst`` copies nothing. Destinations must be distinct."""
    P = k_LNPGH.shape[2]
    pages_XLNGH = jnp.moveaxis(k_LNPGH[:, :, src_X.astype(jnp.int32)], 2, 0)
    dst_X1 = _drop_sentinel(dst_X, P)[:, None]
    return _scatter_rows(k_LNPGH, (2,), dst_X1, pages_XLNGH)
