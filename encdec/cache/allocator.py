"""Host-side page ownership: a free list and reference counts for one page pool.

Only the host scheduler changes who owns which page; the device only reads page tables
(DESIGN.md). One :class:`PageAllocator` serves one pool: the engine keeps one for the self
pages and one for the cross pages.

Page 0 (and every page below ``reserved``) is the *sentinel*: it is never handed out, page
tables point their unused entries at it, and masked writes address it (the pool's writes
drop them, so it stays all zeros).

Running out of pages is a normal condition the scheduler plans around: :meth:`allocate`
returns ``None`` and changes nothing. Misuse (freeing a page nobody holds, freeing the
sentinel, a page id out of range) raises :class:`PageAllocatorError`, before any page is
touched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

SENTINEL_PAGE = 0
"""The page unused page-table entries and masked writes point at."""


class PageAllocatorError(ValueError):
    """A page operation that would corrupt ownership (double free, sentinel, bad id)."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold ``num_tokens`` tokens: ``ceil(num_tokens / page_size)``."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
    return -(-num_tokens // page_size)


class PageAllocator:
    """Free list plus reference counts over pages ``reserved .. num_pages - 1``.

    A page is *free* at reference count 0 and *used* above it. :meth:`allocate` hands out
    free pages at count 1, :meth:`share` adds a holder (beams sharing a request's cross
    pages), :meth:`free` drops one; a page returns to the free list when its count reaches 0.
    Every operation is O(pages touched).
    """

    def __init__(self, num_pages: int, *, reserved: int = 1):
        if reserved < 1:
            raise ValueError(f"reserved must be >= 1 (page {SENTINEL_PAGE} is the sentinel), got {reserved}")
        if num_pages < reserved:
            raise ValueError(f"num_pages={num_pages} is smaller than reserved={reserved}")
        self._num_pages = num_pages
        self._reserved = reserved
        self._refcount = [0] * num_pages
        # A stack: allocate pops from the end, so low page ids go out first on a fresh pool.
        self._free = list(range(num_pages - 1, reserved - 1, -1))

    @property
    def num_pages(self) -> int:
        """Pages in the pool, sentinel(s) included."""
        return self._num_pages

    @property
    def reserved(self) -> int:
        """Pages ``0 .. reserved - 1`` are never handed out."""
        return self._reserved

    @property
    def capacity(self) -> int:
        """Pages that can be handed out at all."""
        return self._num_pages - self._reserved

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def refcount(self, page: int) -> int:
        self._check_id(page)
        return self._refcount[page]

    def allocate(self, n: int) -> list[int] | None:
        """``n`` free pages at reference count 1, or ``None`` (and no change) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        for page in pages:
            self._refcount[page] = 1
        pages.reverse()
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """Add one holder to each page (all must be in use); a page may be listed several times."""
        pages = list(pages)
        for page in pages:
            self._check_id(page)
            if self._refcount[page] == 0:
                raise PageAllocatorError(f"cannot share page {page}: it is free")
        for page in pages:
            self._refcount[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one holder from each page; pages whose count reaches 0 become free.

        Raises :class:`PageAllocatorError` (and changes nothing) if a page is a sentinel, out of
        range, or would be freed more times than it is held.
        """
        counts = Counter(pages)
        for page, times in counts.items():
            self._check_id(page)
            held = self._refcount[page]
            if held == 0:
                raise PageAllocatorError(f"double free: page {page} is already free")
            if held < times:
                raise PageAllocatorError(f"cannot free page {page} {times} times: it has {held} holder(s)")
        for page, times in counts.items():
            self._refcount[page] -= times
            if self._refcount[page] == 0:
                self._free.append(page)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the free list and the counts disagree (for tests and debugging)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert all(self._reserved <= p < self._num_pages for p in free), "a reserved page is on the free list"
        for page in range(self._reserved):
            assert self._refcount[page] == 0, f"sentinel page {page} has holders"
        for page in range(self._reserved, self._num_pages):
            count = self._refcount[page]
            assert count >= 0, f"page {page} has a negative count"
            assert (count == 0) == (page in free), (
                f"page {page}: count {count} but on free list: {page in free}"
            )

    def _check_id(self, page: int) -> None:
        if not isinstance(page, int) and not hasattr(page, "__index__"):
            raise PageAllocatorError(f"page ids are integers, got {page!r}")
        if not 0 <= page < self._num_pages:
            raise PageAllocatorError(f"page {page} is out of range [0, {self._num_pages})")
        if page < self._reserved:
            raise PageAllocatorError(
                f"page {page} is a reserved sentinel page; it is never allocated or freed"
            )

    def __repr__(self) -> str:
        return f"PageAllocator(num_pages={self._num_pages}, reserved={self._reserved}, free={self.num_free})"
