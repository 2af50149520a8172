"""Paged decode attention with an optional fused T5 relative-position bias.

One decode query per slot attends over that slot's keys, which live in a shared pool of
fixed-size pages addressed through a per-slot page table.

Shape letters used in names throughout this package:

- ``B`` slots (batch rows), ``N`` heads, ``H`` head dim;
- ``P`` pages in the pool, ``G`` tokens per page, ``M`` page-table width (pages per slot);
- ``R`` relative-position buckets, ``K`` key positions (``M * G``);
- ``S`` flash-decoding splits of a slot's pages, ``T`` rows of the flattened pool (``P * G``).
"""

from pallas_kernels.paged_attention.api import paged_attention
from pallas_kernels.paged_attention.kernel import PagedAttentionBlock

__all__ = ["PagedAttentionBlock", "paged_attention"]
