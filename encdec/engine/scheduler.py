"""The engine's host policy in plain Python: queue, slots, pages, admission, dispatch length.

The scheduler decides and the engine executes (vLLM's split). Each :meth:`Scheduler.schedule`
returns a :class:`Plan` for one round: which queued requests start in which slots with which
pages (their encoder batch runs before the decode, unless they share a live request's cross
pages), which self pages running slots gain, which requests are preempted, how many decode steps
the dispatch runs, who owns each slot during it, and which requests' token budgets end inside
it. The engine reads a dispatch's results one dispatch late and reports each ended request with
:meth:`finish`. Only the scheduler changes page ownership; it never touches JAX or a device.

Policy:

- **FIFO admission** while the head's slots and pages are free: the head waits for them
  rather than letting smaller requests pass, so nothing behind it can starve it. A request
  with ``width`` slots (beams or samples) takes that many slots and self-page sets, and one
  set of cross pages. ``static`` mode admits only into an all-free batch.
- **Self pages** (``EngineConfig.kv_allocation``): ``reserve`` gives a slot pages for its whole
  budget at admission (never preempts); ``incremental`` gives it pages as its sequence grows,
  before each dispatch for the steps it runs, and admits a request only while
  ``kv_reserve_pages`` stay free for the running ones to grow into.
- **Preemption** (``incremental``): when the running requests' next dispatch needs more self
  pages than are free, the latest-admitted request gives all its pages back and returns to the
  head of the queue; the engine resumes it by re-encoding and replaying its tokens. The oldest
  running request is never preempted for a younger one, so nothing starves.
- **Cross pages** (:mod:`encdec.engine.cross_cache`): shared between requests with the same
  encoder input (no second encode), and kept idle after use until the pool needs them.
- **Data shards** (:mod:`encdec.engine.data_shards`): over a mesh with ``D`` data shards each
  shard has its own slots, self and cross allocators and cross cache; a request starts, grows
  and is preempted within one shard, and the reserve and preemption rules above apply per shard.
- **Encoder budget** (``EngineConfig.encoder_budget``): while slots are decoding, at most that
  many padded encoder tokens are admitted per round (always at least one request).
- **Dispatch length**: ``steps_per_dispatch``, cut where the longest remaining budget ends and,
  while requests wait (in-flight), at the length that does the most work per unit of time given
  the dispatch's fixed cost (:func:`dispatch_length`): where the first budget ends when a
  dispatch costs nothing extra (CPU), longer where a step is cheap next to it (GPU).
- **Early hand-on**: a request whose token budget ends inside the dispatch just planned gives
  up its slot and pages in the same plan; it drains on the device while the next request's
  encode is queued behind it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Hashable, Iterator

from encdec.cache.allocator import pages_for
from encdec.engine.config import EngineConfig
from encdec.engine.cross_cache import CrossEntry
from encdec.engine.data_shards import DataShards


class NeverFits(ValueError):
    """A request needs more slots or pages than the engine has in all."""


@dataclasses.dataclass(frozen=True)
class SeqSpec:
    """What the scheduler knows of a request: its size, not its content."""

    rid: int
    encoder_len: int
    """Encoder positions (cross pages hold them)."""
    bucket: int
    """Padded length of its encoder row: what it costs the encoder budget."""
    decode_steps: int
    """Decode steps until its token budget ends: forced prefix steps plus ``max_new_tokens``
    (``len(prefix) - 1 + max_new_tokens``, also the self-attention tokens it stores)."""
    width: int = 1
    """Decode slots it holds (beams or independent samples); each stores its own self tokens,
    all read one copy of its cross K/V."""
    input_key: Hashable | None = None
    """Identity of its encoder input (row and adapter): equal keys share cross pages. None: never."""
    prefill: int = 0
    """Of ``decode_steps``, forced prefix steps its encode step runs at once (the decoder over the
    prefix in one pass: Whisper's previous-text prompt) when it is encoded; a start on shared
    cross pages feeds them a step at a time."""


@dataclasses.dataclass(frozen=True)
class Admission:
    """A request starting in ``slots`` with these pages."""

    rid: int
    slots: tuple[int, ...]
    self_pages: tuple[tuple[int, ...], ...]
    """Each slot's own self pages so far (all of them under ``reserve``)."""
    cross_pages: tuple[int, ...]
    encode: bool = True
    """False: its cross pages already hold its encoder output (shared); only start its slots."""
    prefilled: int = 0
    """Forced prefix steps the encode step runs (:attr:`SeqSpec.prefill` when encoded, else 0)."""


@dataclasses.dataclass(frozen=True)
class PageGrant:
    """A self page a running slot gains before the dispatch: entry ``index`` of its table
    (``page``: an id in the slot's data shard's block)."""

    slot: int
    index: int
    page: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """One round of the engine loop."""

    admitted: tuple[Admission, ...]
    """Requests to encode (or share) and start, in admission order."""
    num_steps: int
    """Decode steps of this round's dispatch; 0: no slot is busy, no dispatch."""
    owners: tuple[int | None, ...]
    """The request each slot decodes for in this dispatch (None: idle)."""
    handed_on: tuple[int, ...]
    """Requests whose budget ends inside this dispatch: their slots and pages are free already."""
    grants: tuple[PageGrant, ...] = ()
    """Self pages to add to page tables before this dispatch (``incremental``)."""
    preempted: tuple[int, ...] = ()
    """Requests that gave their slots and pages back (stop their slots; they are queued again)."""


def dispatch_length(budgets: list[tuple[int, int]], most: int, overhead: float) -> int:
    """Steps for a dispatch while requests wait: the length in ``1 .. most`` that does the most
    slot-steps of work per unit of time, ``sum(width * min(steps, remaining)) / (overhead + steps)``
    over ``budgets`` (each running request's slots and remaining steps); the longest on ties.

    A slot whose budget ends inside the dispatch idles until it ends, so with no overhead the
    dispatch stops where the first budget ends; a dispatch that costs ``overhead`` steps of time
    besides its steps lets a few slots idle rather than pay for another.
    """
    best, best_rate = 1, -1.0
    for steps in range(1, most + 1):
        work = sum(width * min(steps, remaining) for width, remaining in budgets)
        rate = work / (overhead + steps)
        if rate >= best_rate * (1 - 1e-12):
            best, best_rate = steps, rate
    return best


@dataclasses.dataclass
class _Running:
    spec: SeqSpec
    slots: tuple[int, ...]
    self_pages: list[list[int]]
    cross: CrossEntry
    shard: int
    """The data shard holding its slots and pages."""
    order: int
    """Admission order (preemption takes the latest first)."""
    prefilled: int = 0
    """Steps its encode step ran (:attr:`Admission.prefilled`)."""
    steps_dispatched: int = 0
    draining: bool = False
    """Its slot and pages were handed on; the dispatch in flight ends it on the device."""

    @property
    def remaining(self) -> int:
        return self.spec.decode_steps - self.prefilled - self.steps_dispatched

    @property
    def cross_pages(self) -> tuple[int, ...]:
        return self.cross.pages


class Scheduler:
    """Slots, both page allocators and the request queue of one engine (see the module doc)."""

    def __init__(
        self, config: EngineConfig, *, num_self_pages: int, num_cross_pages: int, data_shards: int = 1
    ):
        """``num_*_pages``: each data shard's pages (its pool block, sentinel included)."""
        self.config = config
        self.shards = DataShards(
            config.num_slots,
            data_shards,
            self_pages_per_shard=num_self_pages,
            cross_pages_per_shard=num_cross_pages,
            cross_cache_pages=config.cross_cache_pages,
        )
        # With one shard, its allocators and cache; with several, views summing over the shards.
        self.self_alloc = self.shards.self_alloc
        self.cross_alloc = self.shards.cross_alloc
        self.cross_cache = self.shards.cross_cache
        self.slots: list[int | None] = [None] * config.num_slots
        self._queue: collections.deque[SeqSpec] = collections.deque()
        self._queued_ids: set[int] = set()
        self._running: dict[int, _Running] = {}
        self._order = itertools.count()
        self.preemptions = 0
        self._overhead = config.dispatch_overhead
        self.reset_peaks()

    @property
    def incremental(self) -> bool:
        return self.config.kv_allocation == "incremental"

    # ---- requests in and out ------------------------------------------------------------------

    def pages_needed(self, spec: SeqSpec) -> tuple[int, int]:
        """Self pages of one slot for its whole budget, and cross pages (its encoder positions)."""
        G = self.config.page_size
        return pages_for(spec.decode_steps, G), pages_for(spec.encoder_len, G)

    def add(self, spec: SeqSpec, *, front: bool = False) -> None:
        """Queue a request (``front``: a preempted one, ahead of the rest); :class:`NeverFits` if
        it needs more slots or pages than there are."""
        need_self, need_cross = self.pages_needed(spec)
        shards = self.shards
        if spec.width > shards.slots_per_shard:
            where = "the engine" if shards.num_shards == 1 else "a data shard"
            raise NeverFits(f"request needs {spec.width} slots; {where} has {shards.slots_per_shard}")
        if need_self * spec.width > shards.self_capacity or need_cross > shards.cross_capacity:
            where = "the cache has" if shards.num_shards == 1 else "a data shard's cache has"
            raise NeverFits(
                f"request needs {need_self * spec.width} self and {need_cross} cross pages; {where} "
                f"{shards.self_capacity} and {shards.cross_capacity}: it can never fit"
            )
        if spec.rid in self._running or spec.rid in self._queued_ids:
            raise ValueError(f"request {spec.rid} is already scheduled")
        if front:
            self._queue.appendleft(spec)
        else:
            self._queue.append(spec)
        self._queued_ids.add(spec.rid)

    def finish(self, rid: int) -> None:
        """A request ended (its last token was read, or its encode failed): free what it holds."""
        if rid in self._queued_ids:  # preempted, and its last token arrived meanwhile
            self._dequeue(rid)
            return
        run = self._running.pop(rid, None)
        if run is not None and not run.draining:
            self._release(run)

    def cancel(self, rid: int) -> tuple[int, ...]:
        """Drop a request; returns the slots to stop on the device (none: queued, draining or unknown)."""
        if rid in self._queued_ids:
            self._dequeue(rid)
            return ()
        run = self._running.pop(rid, None)
        if run is None or run.draining:
            return ()  # a draining request ends on device in the dispatch in flight
        self._release(run)
        return run.slots

    def _dequeue(self, rid: int) -> None:
        self._queued_ids.discard(rid)
        self._queue.remove(next(s for s in self._queue if s.rid == rid))

    # ---- one round -------------------------------------------------------------------------------

    def schedule(self) -> Plan:
        """Admit, grow or preempt, size the next dispatch and hand on the slots it ends."""
        c = self.config
        preempted = self._make_room() if self.incremental else ()
        admitted = self._admit(preempted)
        owners = tuple(self.slots)
        holders = [self._running[rid] for rid in dict.fromkeys(owners) if rid is not None]
        if not holders:
            return Plan(admitted, 0, owners, (), (), preempted)
        steps = min(c.steps_per_dispatch, max(r.remaining for r in holders))
        if c.mode == "inflight" and self._queue:
            budgets = [(r.spec.width, r.remaining) for r in holders]
            steps = dispatch_length(budgets, steps, self._overhead)
        steps = max(1, steps)
        grants = self._grow(holders, steps) if self.incremental else ()
        handed_on = []
        for run in holders:
            run.steps_dispatched += steps
            if run.remaining <= 0:
                self._release(run)
                run.draining = True
                handed_on.append(run.spec.rid)
        return Plan(admitted, steps, owners, tuple(handed_on), grants, preempted)

    def _pages_for_steps(self, run: _Running, steps: int) -> int:
        """Self pages one of ``run``'s slots needs to run ``steps`` more steps."""
        stored = min(run.prefilled + run.steps_dispatched + steps, run.spec.decode_steps)
        return pages_for(stored, self.config.page_size)

    def _growth(self, run: _Running, steps: int) -> int:
        return sum(max(0, self._pages_for_steps(run, steps) - len(p)) for p in run.self_pages)

    def _running_growth(self, shard: int) -> int:
        """Self pages the shard's running requests need for a full dispatch."""
        steps = self.config.steps_per_dispatch
        return sum(
            self._growth(r, steps) for r in self._running.values() if not r.draining and r.shard == shard
        )

    def _make_room(self) -> tuple[int, ...]:
        """Preempt the latest-admitted requests of each data shard until the others' next
        dispatch fits in the shard's self pages."""
        preempted = []
        for d, alloc in enumerate(self.shards.self_allocs):
            while self._running_growth(d) > alloc.num_free:
                live = [r for r in self._running.values() if not r.draining and r.shard == d]
                if len(live) <= 1:
                    break  # alone, a request always fits (``add`` checked its whole budget)
                victim = max(live, key=lambda r: r.order)
                del self._running[victim.spec.rid]
                self._release(victim)
                preempted.append(victim)
        for victim in sorted(preempted, key=lambda r: -r.order):
            self.add(victim.spec, front=True)  # the earliest of them ends up first
        self.preemptions += len(preempted)
        return tuple(v.spec.rid for v in preempted)

    def _grow(self, holders: list[_Running], steps: int) -> tuple[PageGrant, ...]:
        grants = []
        for run in holders:
            need = self._pages_for_steps(run, steps)
            alloc = self.shards.self_allocs[run.shard]
            for slot, pages in zip(run.slots, run.self_pages, strict=True):
                new = alloc.allocate(max(0, need - len(pages)))
                assert new is not None, "room was made for every running request's next dispatch"
                grants.extend(PageGrant(slot, len(pages) + i, p) for i, p in enumerate(new))
                pages.extend(new)
        self.peak_self_pages = max(self.peak_self_pages, self.self_alloc.num_used)
        return tuple(grants)

    def _admit(self, preempted: tuple[int, ...] = ()) -> tuple[Admission, ...]:
        c = self.config
        free = [i for i, s in enumerate(self.slots) if s is None]
        if c.mode == "static" and len(free) < c.num_slots:
            return ()
        budgeted = c.mode == "inflight" and len(free) < c.num_slots
        budget = c.encoder_budget
        shards = self.shards
        # Self pages each shard keeps free for its running requests to grow into (none while it
        # runs nothing: alone, a request always fits); ``kv_reserve_pages`` is a total, like the
        # page counts, and each shard keeps its share.
        share = -(-c.self_reserve_pages // shards.num_shards)
        reserve = [
            self._running_growth(d) + share if self.incremental else 0 for d in range(shards.num_shards)
        ]
        busy = {r.shard for r in self._running.values()}
        admitted: list[Admission] = []
        while self._queue:
            spec = self._queue[0]
            if spec.rid in preempted:
                break  # its last dispatch's tokens are read after this round: resume it next round
            need_self, need_cross = self.pages_needed(spec)
            if self.incremental:
                first = spec.prefill + c.steps_per_dispatch  # a shared start then holds a few early
                need_self = pages_for(min(first, spec.decode_steps), c.page_size)
            keep = [reserve[d] if d in busy else 0 for d in range(shards.num_shards)]
            key, width = spec.input_key, spec.width
            chosen = shards.choose(self.slots, width, need_self * width, keep, key, need_cross)
            if chosen is None:
                break
            d, shared = chosen
            if budgeted and admitted and not shared and spec.bucket > budget:
                break
            self_pages = shards.self_allocs[d].allocate(need_self * spec.width)
            cross, hit = shards.cross_caches[d].acquire(spec.input_key, need_cross)
            self._queue.popleft()
            self._queued_ids.discard(spec.rid)
            if budgeted and not hit:
                budget -= spec.bucket
            slots = tuple(shards.free_slots(self.slots, d)[: spec.width])
            per_slot = [self_pages[i * need_self : (i + 1) * need_self] for i in range(spec.width)]
            for slot in slots:
                self.slots[slot] = spec.rid
            busy.add(d)
            prefilled = 0 if hit else spec.prefill
            run = _Running(spec, slots, per_slot, cross, d, next(self._order), prefilled=prefilled)
            self._running[spec.rid] = run
            pages = tuple(map(tuple, per_slot))
            admitted.append(
                Admission(spec.rid, slots, pages, cross.pages, encode=not hit, prefilled=prefilled)
            )
        if admitted:  # before any hand-on: a request may give its pages back in the same round
            self.peak_self_pages = max(self.peak_self_pages, self.self_alloc.num_used)
            self.peak_cross_pages = max(self.peak_cross_pages, self.cross_alloc.num_used)
        return tuple(admitted)

    def _release(self, run: _Running) -> None:
        for slot, pages in zip(run.slots, run.self_pages, strict=True):
            self.slots[slot] = None
            self.shards.self_allocs[run.shard].free(pages)
        self.shards.cross_caches[run.shard].release(run.cross)

    def forget_cross(self, admission: Admission) -> None:
        """Never share an admitted request's cross entry again (its encode failed)."""
        shard = self.shards.shard_of(admission.slots[0])
        self.shards.cross_caches[shard].forget_entry_of(admission.cross_pages)

    # ---- what is where ---------------------------------------------------------------------------

    def reset_peaks(self) -> None:
        """Start the peak page counts afresh from the pages in use now."""
        self.peak_self_pages = self.self_alloc.num_used
        self.peak_cross_pages = self.cross_alloc.num_used

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def num_running(self) -> int:
        """Requests started and not yet reported finished (draining ones included)."""
        return len(self._running)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def has_work(self) -> bool:
        """Whether a round would do anything: requests queued or holding slots."""
        return bool(self._queue) or self.busy_slots > 0

    def queued(self) -> Iterator[int]:
        return (s.rid for s in self._queue)

    def is_draining(self, rid: int) -> bool:
        run = self._running.get(rid)
        return run is not None and run.draining

    def pages_of(self, rid: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Self and cross pages a running request holds (empty once handed on)."""
        run = self._running[rid]
        if run.draining:
            return (), ()
        return tuple(p for pages in run.self_pages for p in pages), run.cross_pages
