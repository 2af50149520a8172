"""Slots and pages split over a mesh's ``data`` axis, and where a request runs (host, pure Python).

With ``D`` data shards, shard ``d`` owns slots ``d * B/D .. (d + 1) * B/D - 1`` and a block of
each page pool with its own :class:`~encdec.cache.allocator.PageAllocator` and its own
:class:`~encdec.engine.cross_cache.CrossCache`: page ids are local to the block (page 0 is the
shard's sentinel), because the device steps run per data shard on their block alone
(:func:`encdec.sharding.over_data`). A request takes all its slots (a beam group or its
samples), its self pages, its page grants and its cross pages from one shard, so page tables and
beam parents never cross shards, and a cached cross entry is shared only by requests placed on
the shard that holds it. With one shard this is exactly the single-device policy: the first
free slots, pages from the one allocator, the one cross cache.

The choice among the shards where a request fits (:meth:`DataShards.choose`): one whose cross
cache holds its input (no encode), else the one with the most free slots (the lowest index on
ties), which spreads requests evenly and is deterministic (every host of a multi-host engine
makes the same choice).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from encdec.cache.allocator import PageAllocator
from encdec.engine.cross_cache import CrossCache


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


class CrossCacheShards:
    """Several shards' cross caches read as one (figures, adapter changes, tests)."""

    def __init__(self, caches: Sequence[CrossCache]):
        self.shards = list(caches)

    @property
    def idle_pages(self) -> int:
        return sum(c.idle_pages for c in self.shards)

    @property
    def lookups(self) -> int:
        return sum(c.lookups for c in self.shards)

    @property
    def hits(self) -> int:
        return sum(c.hits for c in self.shards)

    def reset_counts(self) -> None:
        for c in self.shards:
            c.reset_counts()

    def forget(self, stale: Callable[[Hashable], bool]) -> None:
        for c in self.shards:
            c.forget(stale)

    def clear_idle(self) -> None:
        for c in self.shards:
            c.clear_idle()


class DataShards:
    """Slot ranges, per-shard page allocators and cross caches of ``num_shards`` data shards."""

    def __init__(
        self,
        num_slots: int,
        num_shards: int,
        *,
        self_pages_per_shard: int,
        cross_pages_per_shard: int,
        cross_cache_pages: int | None = None,
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
        self.cross_caches = [CrossCache(a, cross_cache_pages) for a in self.cross_allocs]
        one = num_shards == 1
        self.self_alloc = self.self_allocs[0] if one else AllocatorShards(self.self_allocs)
        self.cross_alloc = self.cross_allocs[0] if one else AllocatorShards(self.cross_allocs)
        self.cross_cache = self.cross_caches[0] if one else CrossCacheShards(self.cross_caches)

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

    def free_slots(self, owners: Sequence[int | None], shard: int) -> list[int]:
        """The shard's free slots (global ids, ascending); ``owners`` is the scheduler's slot table."""
        S = self.slots_per_shard
        return [S * shard + i for i in range(S) if owners[S * shard + i] is None]

    def choose(
        self,
        owners: Sequence[int | None],
        width: int,
        self_pages: int,
        keep_free: Sequence[int],
        key: Hashable | None,
        cross_pages: int,
    ) -> tuple[int, bool] | None:
        """The shard to start a request in and whether its cross cache holds the input (a hit),
        or None if no shard has ``width`` free slots, ``self_pages`` free self pages beyond its
        ``keep_free[d]`` and room for the cross pages (changes nothing)."""
        best = None
        for d in range(self.num_shards):
            free = len(self.free_slots(owners, d))
            fits = (
                free >= width
                and self.self_allocs[d].num_free - self_pages >= keep_free[d]
                and self.cross_caches[d].can_acquire(key, cross_pages)
            )
            if not fits:
                continue
            rank = (self.cross_caches[d].find(key) is not None, free)
            if best is None or rank > best[0]:
                best = (rank, d)
        return None if best is None else (best[1], best[0][0])
