"""Cross-attention pages shared by requests with the same encoder input, and kept after they end.

Many prompts on one document, Whisper's temperature fallback over one window, several tasks on
one clip: their encoder outputs, and so their cross K/V, are identical. A request whose
*input key* (its encoder row and adapter, hashed by the engine) matches a live entry shares that
entry's pages by reference count and skips the encoder; when the last user ends, the entry
goes idle and stays in a least-recently-used list, bounded by ``max_idle_pages`` and evicted
first whenever a fresh allocation finds the pool short. Only the scheduler calls this.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable

from encdec.cache.allocator import PageAllocator


@dataclasses.dataclass(eq=False)
class CrossEntry:
    """One encoder result's cross pages and the requests using them."""

    key: Hashable | None
    pages: tuple[int, ...]
    users: int = 1
    listed: bool = True
    """Found by lookups (False once forgotten: it then frees its pages when its users end)."""


class CrossCache:
    """Live and idle cross-page entries over one allocator (see the module doc)."""

    def __init__(self, alloc: PageAllocator, max_idle_pages: int | None):
        self.alloc = alloc
        self.max_idle_pages = max_idle_pages
        self._live: dict[Hashable, CrossEntry] = {}
        self._idle: collections.OrderedDict[Hashable, CrossEntry] = collections.OrderedDict()
        self.lookups = 0
        self.hits = 0

    @property
    def idle_pages(self) -> int:
        return sum(len(e.pages) for e in self._idle.values())

    def reset_counts(self) -> None:
        self.lookups = self.hits = 0

    def find(self, key: Hashable | None) -> CrossEntry | None:
        """The entry a request with ``key`` would share, if any (no change)."""
        if key is None:
            return None
        return self._live.get(key) or self._idle.get(key)

    def can_acquire(self, key: Hashable | None, n: int) -> bool:
        """Whether :meth:`acquire` would succeed (evicting idle entries if needed)."""
        if self.find(key) is not None:
            return True
        return self.alloc.num_free + self._evictable(exclude=key) >= n

    def acquire(self, key: Hashable | None, n: int) -> tuple[CrossEntry, bool] | None:
        """Pages for a request: a shared entry (``hit``) or ``n`` fresh pages; None if they do
        not fit even after evicting every idle entry (nothing changes then)."""
        if key is not None:
            self.lookups += 1
            entry = self._live.get(key)
            if entry is not None:
                self.alloc.share(entry.pages)
                entry.users += 1
                self.hits += 1
                return entry, True
            entry = self._idle.pop(key, None)
            if entry is not None:  # the idle reference becomes this user's
                entry.users = 1
                self._live[key] = entry
                self.hits += 1
                return entry, True
        if not self.can_acquire(key, n):
            return None
        while not self.alloc.can_allocate(n):
            self._evict_oldest()
        entry = CrossEntry(key, tuple(self.alloc.allocate(n)), listed=key is not None)
        if entry.listed:
            self._live[key] = entry
        return entry, False

    def release(self, entry: CrossEntry) -> None:
        """A user ended: drop its reference; the last one idles the entry (or frees it)."""
        entry.users -= 1
        if entry.users > 0:
            self.alloc.free(entry.pages)
            return
        if entry.listed and self._live.get(entry.key) is entry:
            del self._live[entry.key]
            if self.max_idle_pages is None or len(entry.pages) <= self.max_idle_pages:
                self._idle[entry.key] = entry
                while self.max_idle_pages is not None and self.idle_pages > self.max_idle_pages:
                    self._evict_oldest()
                return
        self.alloc.free(entry.pages)

    def forget(self, stale: Callable[[Hashable], bool]) -> None:
        """Never share entries whose key is ``stale`` again (their adapter changed): idle ones
        are freed, live ones free their pages when their last user ends."""
        for key in [k for k in self._idle if stale(k)]:
            self.alloc.free(self._idle.pop(key).pages)
        for key in [k for k in self._live if stale(k)]:
            self._live.pop(key).listed = False

    def forget_entry_of(self, pages: tuple[int, ...]) -> None:
        """Never share the live entry holding ``pages`` again (its encode failed)."""
        for key, entry in list(self._live.items()):
            if entry.pages == pages:
                del self._live[key]
                entry.listed = False

    def clear_idle(self) -> None:
        while self._idle:
            self._evict_oldest()

    def _evictable(self, exclude: Hashable | None) -> int:
        return sum(len(e.pages) for k, e in self._idle.items() if k != exclude)

    def _evict_oldest(self) -> None:
        _, entry = self._idle.popitem(last=False)
        self.alloc.free(entry.pages)
