"""The engine's host policy in plain Python: queue, slots, pages, admission, dispatch length.

The scheduler decides and the engine executes (vLLM's split). Each :meth:`Scheduler.schedule`
returns a :class:`Plan` for one round: which queued requests start in which slots with which
pages (their encoder batch runs before the decode), how many decode steps the dispatch runs,
who owns each slot during it, and which requests' token budgets end inside it. The engine reads
a dispatch's results one dispatch late and reports each ended request with :meth:`finish`.
Only the scheduler changes page ownership; it never touches JAX, a model or a device.

Policy:

- **FIFO admission** while the head's slots and pages are free: the head waits for them
  rather than letting smaller requests pass, so nothing behind it can starve it. A request
  with ``width`` slots (beams or samples) takes that many slots and self-page sets, and one
  set of cross pages, shared. ``static`` mode admits only into an all-free batch.
- **Encoder budget** (``EngineConfig.encoder_budget``): while slots are decoding, at most that
  many padded encoder tokens are admitted per round (always at least one request), so a burst
  of long inputs does not freeze the decoding slots behind serial encoder passes.
- **Dispatch length**: ``steps_per_dispatch``, cut where the longest remaining budget ends and,
  while requests wait (in-flight), where the first one does, so that slot is refilled at once.
- **Early hand-on**: a request whose token budget ends inside the dispatch just planned gives
  up its slot and pages in the same plan (it cannot need them after that dispatch); it drains
  on the device while the next request's encode is queued behind it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

from encdec.cache.allocator import pages_for
from encdec.engine.config import EngineConfig
from encdec.engine.data_shards import DataShards


class NeverFits(ValueError):
    """A request needs more pages than its pool holds in all."""


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


@dataclasses.dataclass(frozen=True)
class Admission:
    """A request starting in ``slots`` with these pages (its encode runs before the decode)."""

    rid: int
    slots: tuple[int, ...]
    self_pages: tuple[tuple[int, ...], ...]
    """Each slot's own self pages."""
    cross_pages: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """One round of the engine loop."""

    admitted: tuple[Admission, ...]
    """Requests to encode and start, in admission order."""
    num_steps: int
    """Decode steps of this round's dispatch; 0: no slot is busy, no dispatch."""
    owners: tuple[int | None, ...]
    """The request each slot decodes for in this dispatch (None: idle)."""
    handed_on: tuple[int, ...]
    """Requests whose budget ends inside this dispatch: their slots and pages are free already."""


@dataclasses.dataclass
class _Running:
    spec: SeqSpec
    slots: tuple[int, ...]
    self_pages: tuple[tuple[int, ...], ...]
    cross_pages: tuple[int, ...]
    steps_dispatched: int = 0
    draining: bool = False
    """Its slot and pages were handed on; the dispatch in flight ends it on the device."""

    @property
    def remaining(self) -> int:
        return self.spec.decode_steps - self.steps_dispatched


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
        )
        self.self_alloc = self.shards.self_alloc
        self.cross_alloc = self.shards.cross_alloc
        self.slots: list[int | None] = [None] * config.num_slots
        self._queue: collections.deque[SeqSpec] = collections.deque()
        self._queued_ids: set[int] = set()
        self._running: dict[int, _Running] = {}
        self.reset_peaks()

    # ---- requests in and out ------------------------------------------------------------------

    def pages_needed(self, spec: SeqSpec) -> tuple[int, int]:
        """Self pages of one slot (every token it stores) and cross pages (its encoder positions)."""
        G = self.config.page_size
        return pages_for(spec.decode_steps, G), pages_for(spec.encoder_len, G)

    def add(self, spec: SeqSpec) -> None:
        """Queue a request; :class:`NeverFits` if it needs more slots or pages than there are."""
        need_self, need_cross = self.pages_needed(spec)
        shards = self.shards
        if spec.width > shards.slots_per_shard:
            where = "the engine" if shards.num_shards == 1 else "a data shard"
            raise NeverFits(f"request needs {spec.width} slots; {where} has {shards.slots_per_shard}")
        if need_self * spec.width > shards.self_capacity or need_cross > shards.cross_capacity:
            raise NeverFits(
                f"request needs {need_self * spec.width} self and {need_cross} cross pages; the cache has "
                f"{shards.self_capacity} and {shards.cross_capacity}: it can never fit"
            )
        if spec.rid in self._running or spec.rid in self._queued_ids:
            raise ValueError(f"request {spec.rid} is already scheduled")
        self._queue.append(spec)
        self._queued_ids.add(spec.rid)

    def finish(self, rid: int) -> None:
        """A request ended (its last token was read, or its encode failed): free what it holds."""
        run = self._running.pop(rid, None)
        if run is not None and not run.draining:
            self._release(run)

    def cancel(self, rid: int) -> tuple[int, ...]:
        """Drop a request; returns the slots to stop on the device (none: queued, draining or unknown)."""
        if rid in self._queued_ids:
            self._queued_ids.discard(rid)
            self._queue.remove(next(s for s in self._queue if s.rid == rid))
            return ()
        run = self._running.pop(rid, None)
        if run is None or run.draining:
            return ()  # a draining request ends on device in the dispatch in flight
        self._release(run)
        return run.slots

    # ---- one round -------------------------------------------------------------------------------

    def schedule(self) -> Plan:
        """Admit, size the next dispatch and hand on the slots whose budgets it ends."""
        admitted = self._admit()
        owners = tuple(self.slots)
        holders = [self._running[rid] for rid in dict.fromkeys(owners) if rid is not None]
        if not holders:
            return Plan(admitted, 0, owners, ())
        c = self.config
        steps = min(c.steps_per_dispatch, max(r.remaining for r in holders))
        if c.mode == "inflight" and self._queue:
            steps = min(steps, min(r.remaining for r in holders))
        steps = max(1, steps)
        handed_on = []
        for run in holders:
            run.steps_dispatched += steps
            if run.remaining <= 0:
                self._release(run)
                run.draining = True
                handed_on.append(run.spec.rid)
        return Plan(admitted, steps, owners, tuple(handed_on))

    def _admit(self) -> tuple[Admission, ...]:
        c = self.config
        free = [i for i, s in enumerate(self.slots) if s is None]
        if c.mode == "static" and len(free) < c.num_slots:
            return ()
        budgeted = c.mode == "inflight" and len(free) < c.num_slots
        budget = c.encoder_budget
        admitted: list[Admission] = []
        while self._queue:
            spec = self._queue[0]
            if budgeted and admitted and spec.bucket > budget:
                break
            # Slots and pages from one data shard (with one shard: the first free slots).
            placed = self.shards.place(self.slots, spec.width, *self.pages_needed(spec))
            if placed is None:
                break
            self._queue.popleft()
            self._queued_ids.discard(spec.rid)
            if budgeted:
                budget -= spec.bucket
            slots, per_slot, cross_pages = placed.slots, placed.self_pages, placed.cross_pages
            for slot in slots:
                self.slots[slot] = spec.rid
            self._running[spec.rid] = _Running(spec, slots, per_slot, cross_pages)
            admitted.append(Admission(spec.rid, slots, per_slot, cross_pages))
        if admitted:  # before any hand-on: a request may give its pages back in the same round
            self.peak_self_pages = max(self.peak_self_pages, self.self_alloc.num_used)
            self.peak_cross_pages = max(self.peak_cross_pages, self.cross_alloc.num_used)
        return tuple(admitted)

    def _release(self, run: _Running) -> None:
        for slot in run.slots:
            self.slots[slot] = None
        self.shards.release(run.slots, run.self_pages, run.cross_pages)

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
