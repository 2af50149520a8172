"""The dual paged KV cache: host-side page allocation and device page pools.

- :mod:`encdec.cache.allocator`: :class:`PageAllocator`, page ownership on the host;
- :mod:`encdec.cache.pools`: :class:`PagePools` (``[L, N, P, G, H]`` K/V arrays for self and
  cross pages), their sizing (:class:`PoolConfig`) and in-place page writes;
- :mod:`encdec.cache.paged_kv`: :class:`PagedKV`, the decoder's ``DecoderKV`` over the pools.

Shape letters are those of :mod:`encdec.models`.
"""

from encdec.cache.allocator import SENTINEL_PAGE, PageAllocator, PageAllocatorError, pages_for
from encdec.cache.paged_kv import PagedKV, write_cross
from encdec.cache.pools import (
    PagePools,
    PoolConfig,
    bytes_per_token_per_layer,
    init_pools,
    pool_bytes,
    write_layer_pages,
    write_layer_rows,
    write_pages,
    write_rows,
)

__all__ = [
    "SENTINEL_PAGE",
    "PageAllocator",
    "PageAllocatorError",
    "PagePools",
    "PagedKV",
    "PoolConfig",
    "bytes_per_token_per_layer",
    "init_pools",
    "pages_for",
    "pool_bytes",
    "write_cross",
    "write_layer_pages",
    "write_layer_rows",
    "write_pages",
    "write_rows",
]
