"""Slots and pages split over a mesh's ``data`` axis, and where a request runs (host, pure Python).

With ``D`` data shards, shard ``d`` owns slots ``d * B/D .. (d + 1) * B/D - 1`` and a block of
each page pool with its own :class:`~encdec.cache.allocator.PageAllocator`: page ids are local
to the block (page 0 is the shard's sentinel), because the device steps run per data shard on
their block alone (:func:`encdec.sharding.over_data`). A request takes all its slots (a beam group
or its samples) and all its pages from one shard, so page tables and beam parents never cross
shards. With one shard this is exactly the single-device policy: the first free slots, pages
from the one allocator.

The choice among shards: the one with the most free slots that also has the pages (the lowest
index on ties), which spreads requests evenly and is deterministic (every host of a multi-host
engine makes the same choice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from encdec.cache.allocator import PageAllocator


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an admitted request runs: its slots (global ids) and pages (ids local to its shard)."""

    shard: int
    slots: tuple[int, ...]
    self_pages: tuple[tuple[int, ...], ...]
    """Each slot's own self pages."""
    cross_pages: tuple[int, ...]


class AllocatorShards:
    """Several shards' allocators read as one pool (capacity, use, invariants) for figures and tests."""

    def __init__(self, allocators: Sequence[PageAllocator]):
        self.shards = list(allocators)

    @property
    def num_pages(self) -> int:
        return sum(a.num_pages for a in self.shards)

    @property
    def capacity(self) -> int:
        return sum(a.capacity for a in self.shards)

    @property
    def num_free(self) -> int:
        return sum(a.num_free for a in self.shards)

    @property
    def num_used(self) -> int:
        return sum(a.num_used for a in self.shards)

    def check_invariants(self) -> None:
        for a in self.shards:
            a.check_invariants()

    def __repr__(self) -> str:
        return f"AllocatorShards({self.shards!r})"


class DataShards:
    """Slot ranges and per-shard page allocators of ``num_shards`` data shards."""

    def __init__(
        self, num_slots: int, num_shards: int, *, self_pages_per_shard: int, cross_pages_per_shard: int
    ):
        if num_shards < 1 or num_slots % num_shards:
            raise ValueError(
                f"num_slots={num_slots} must be a multiple of the mesh's data axis ({num_shards}): "
                "each data shard owns an equal block of slots"
            )
        self.num_shards = num_shards
        self.slots_per_shard = num_slots // num_shards
        self.self_allocs = [PageAllocator(self_pages_per_shard) for _ in range(num_shards)]
        self.cross_allocs = [PageAllocator(cross_pages_per_shard) for _ in range(num_shards)]
        one = num_shards == 1
        self.self_alloc = self.self_allocs[0] if one else AllocatorShards(self.self_allocs)
        self.cross_alloc = self.cross_allocs[0] if one else AllocatorShards(self.cross_allocs)

    def shard_of(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def local_slot(self, slot: int) -> int:
        """A slot's index inside its shard's block (what the device steps see)."""
        return slot % self.slots_per_shard

    @property
    def self_capacity(self) -> int:
        """Self pages one request can ever get (one shard's)."""
        return self.self_allocs[0].capacity

    @property
    def cross_capacity(self) -> int:
        return self.cross_allocs[0].capacity

    def place(
        self, owners: Sequence[int | None], width: int, need_self: int, need_cross: int
    ) -> Placement | None:
        """Slots and pages for a request of ``width`` slots (``need_self`` self pages each,
        ``need_cross`` shared cross pages) in one shard, allocated; None (nothing changed) if no
        shard has them. ``owners`` is the scheduler's slot table (None: free)."""
        S = self.slots_per_shard
        best = None
        for d in range(self.num_shards):
            free = [S * d + i for i in range(S) if owners[S * d + i] is None]
            fits = (
                len(free) >= width
                and self.self_allocs[d].can_allocate(need_self * width)
                and self.cross_allocs[d].can_allocate(need_cross)
            )
            if fits and (best is None or len(free) > len(best[1])):
                best = (d, free)
        if best is None:
            return None
        d, free = best
        self_pages = self.self_allocs[d].allocate(need_self * width)
        cross_pages = self.cross_allocs[d].allocate(need_cross)
        per_slot = tuple(tuple(self_pages[i * need_self : (i + 1) * need_self]) for i in range(width))
        return Placement(d, tuple(free[:width]), per_slot, tuple(cross_pages))

    def release(
        self, slots: Sequence[int], self_pages: Sequence[Sequence[int]], cross_pages: Sequence[int]
    ) -> None:
        """Give a request's pages back to its shard's allocators."""
        d = self.shard_of(slots[0])
        for pages in self_pages:
            self.self_allocs[d].free(pages)
        self.cross_allocs[d].free(cross_pages)
