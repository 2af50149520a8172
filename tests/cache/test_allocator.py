"""PageAllocator: ownership invariants under random operation sequences, and its errors."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from encdec.cache import SENTINEL_PAGE, PageAllocator, PageAllocatorError, pages_for


@pytest.mark.parametrize(
    "tokens, page_size, pages",
    [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (16, 8, 2), (17, 8, 3), (7, 1, 7)],
)
def test_pages_for(tokens, page_size, pages):
    assert pages_for(tokens, page_size) == pages


def test_pages_for_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pages_for(3, 0)
    with pytest.raises(ValueError):
        pages_for(-1, 4)


def _snapshot(alloc: PageAllocator):
    return alloc.num_free, [alloc.refcount(p) for p in range(alloc.reserved, alloc.num_pages)]


def test_fresh_allocator_hands_out_every_page_but_the_sentinel():
    alloc = PageAllocator(9)
    assert (alloc.capacity, alloc.num_free, alloc.num_used) == (8, 8, 0)
    pages = alloc.allocate(8)
    assert sorted(pages) == list(range(1, 9))
    assert alloc.num_free == 0 and not alloc.can_allocate(1) and alloc.can_allocate(0)
    assert alloc.allocate(1) is None
    assert alloc.allocate(0) == []
    alloc.free(pages)
    assert alloc.num_free == 8
    alloc.check_invariants()


def test_failed_allocation_changes_nothing():
    alloc = PageAllocator(6)
    held = alloc.allocate(3)
    before = _snapshot(alloc)
    assert alloc.allocate(3) is None
    assert _snapshot(alloc) == before
    assert alloc.allocate(2) is not None and alloc.num_free == 0
    alloc.free(held)
    alloc.check_invariants()


def test_misuse_raises_clear_errors_and_changes_nothing():
    alloc = PageAllocator(8, reserved=2)
    pages = alloc.allocate(3)
    before = _snapshot(alloc)
    free_page = next(p for p in range(2, 8) if p not in pages)
    cases = [
        ([SENTINEL_PAGE], "sentinel"),
        ([1], "sentinel"),
        ([8], "out of range"),
        ([-1], "out of range"),
        ([pages[0], free_page], "double free"),
        ([pages[0], pages[0]], "2 times"),
    ]
    for bad, message in cases:
        with pytest.raises(PageAllocatorError, match=message):
            alloc.free(bad)
        assert _snapshot(alloc) == before
    with pytest.raises(PageAllocatorError, match="free"):
        alloc.share([pages[1], free_page])
    with pytest.raises(PageAllocatorError, match="sentinel"):
        alloc.share([SENTINEL_PAGE])
    assert _snapshot(alloc) == before
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    alloc.check_invariants()


def test_shared_pages_return_to_the_free_list_with_their_last_holder():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.share(pages)
    alloc.share(pages[:1])
    assert [alloc.refcount(p) for p in pages] == [3, 2]
    alloc.free(pages)
    alloc.free(pages)
    assert alloc.num_free == 2 and alloc.refcount(pages[0]) == 1
    alloc.free(pages[:1])
    assert alloc.num_free == 3
    alloc.check_invariants()


def test_constructor_rejects_no_sentinel():
    with pytest.raises(ValueError):
        PageAllocator(4, reserved=0)
    with pytest.raises(ValueError):
        PageAllocator(1, reserved=2)
    assert PageAllocator(1).capacity == 0


class AllocatorMachine(RuleBasedStateMachine):
    """A model of holders (a request, a beam): each holds a list of pages, one reference each."""

    holders = Bundle("holders")

    @initialize(num_pages=st.integers(1, 24), reserved=st.integers(1, 3))
    def create(self, num_pages, reserved):
        self.alloc = PageAllocator(max(num_pages, reserved), reserved=reserved)
        self.held = {}  # holder id -> pages
        self.next_id = 0

    def _expected_counts(self):
        counts = {}
        for pages in self.held.values():
            for p in pages:
                counts[p] = counts.get(p, 0) + 1
        return counts

    def _new_holder(self, pages):
        self.next_id += 1
        self.held[self.next_id] = list(pages)
        return self.next_id

    @rule(target=holders, n=st.integers(0, 10))
    def allocate(self, n):
        before = _snapshot(self.alloc)
        in_use = set(self._expected_counts())
        pages = self.alloc.allocate(n)
        if pages is None:
            assert n > before[0]
            assert _snapshot(self.alloc) == before
            return self._new_holder([])
        assert len(pages) == n == len(set(pages))
        assert all(self.alloc.reserved <= p < self.alloc.num_pages for p in pages), "sentinel handed out"
        assert not in_use & set(pages), "a used page was handed out again"
        return self._new_holder(pages)

    @rule(target=holders, holder=holders)
    def share(self, holder):
        if holder not in self.held:
            return self._new_holder([])
        self.alloc.share(self.held[holder])
        return self._new_holder(self.held[holder])

    @rule(holder=consumes(holders))
    def free(self, holder):
        pages = self.held.pop(holder, None)
        if pages is not None:
            self.alloc.free(pages)

    @rule(page=st.integers(-2, 30))
    def bad_free(self, page):
        if self.alloc.reserved <= page < self.alloc.num_pages and page in self._expected_counts():
            return
        before = _snapshot(self.alloc)
        with pytest.raises(PageAllocatorError):
            self.alloc.free([page])
        assert _snapshot(self.alloc) == before

    @invariant()
    def counts_match_the_model(self):
        self.alloc.check_invariants()
        counts = self._expected_counts()
        for p in range(self.alloc.reserved, self.alloc.num_pages):
            assert self.alloc.refcount(p) == counts.get(p, 0)
        assert self.alloc.num_used == len(counts)
        assert self.alloc.num_free + self.alloc.num_used == self.alloc.capacity

    def teardown(self):
        for pages in self.held.values():
            self.alloc.free(pages)
        assert self.alloc.num_free == self.alloc.capacity and self.alloc.num_used == 0
        self.alloc.check_invariants()


AllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, database=None
)
TestAllocatorMachine = AllocatorMachine.TestCase
