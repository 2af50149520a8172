"""The scheduler alone, no model and no JAX: random arrivals, EOS, cancellations and tight pools.

A simulated device runs each plan (a request ends at its EOS step or its budget) and reports an
end one dispatch late, as the engine reads results. Requests hold one slot or a group (beams,
samples): one self-page set per slot, one cross-page set per request, shared between requests
with the same input. Pages are reserved at admission or granted as sequences grow, with
preemption under pressure (a preempted request starts over on the device, as its replay does).
After every round: slots and pages are owned once, admission is FIFO, the encoder budget and
dispatch lengths hold, no slot runs past its pages, every handed-on request really ends inside
its last dispatch; at the end nothing starved and no page is held.
"""

import dataclasses

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from encdec.cache.allocator import pages_for
from encdec.engine import EngineConfig, Scheduler
from encdec.engine.scheduler import NeverFits, SeqSpec, dispatch_length

MAX_IN, MAX_NEW, PAGE = 20, 12, 4
BUCKETS = (8, 16, 20)


@dataclasses.dataclass
class Sim:
    spec: SeqSpec
    ends_at: int
    """Decode steps after which the device stops it (its EOS step, or its budget)."""
    done: int = 0
    dispatched: int = 0
    """Steps of the dispatches it owned a slot in (the scheduler's view of its progress)."""
    ended: bool = False


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        slots=st.integers(1, 4),
        tight=st.booleans(),
        mode=st.sampled_from(["inflight", "static"]),
        steps=st.integers(1, 4),
        budget=st.sampled_from([None, 8, 16, 40]),
        incremental=st.booleans(),
        idle=st.sampled_from([None, 0, 5]),
        overhead=st.sampled_from([0.0, 3.0]),
    )
    def start(self, slots, tight, mode, steps, budget, incremental, idle, overhead):
        self.config = EngineConfig(
            num_slots=slots, page_size=PAGE, max_encoder_len=MAX_IN, max_new_tokens=MAX_NEW,
            encoder_buckets=BUCKETS, steps_per_dispatch=steps, mode=mode, encoder_tokens_per_dispatch=budget,
            max_encoder_tokens=40, kv_allocation="incremental" if incremental else "reserve",
            kv_reserve_pages=0, cross_cache_pages=idle, dispatch_overhead_steps=overhead,
        )
        full = 1 + slots * pages_for(1 + MAX_NEW, PAGE), 1 + slots * pages_for(MAX_IN, PAGE)
        pages = (1 + 2 * pages_for(1 + MAX_NEW, PAGE) + 1, 1 + pages_for(MAX_IN, PAGE) + 2) if tight else full
        self.sched = Scheduler(self.config, num_self_pages=pages[0], num_cross_pages=pages[1])
        self.sims: dict[int, Sim] = {}
        self.cancelled: set[int] = set()
        self.finished: set[int] = set()
        self.reported: list[int] = []  # ended in the dispatch in flight: read next round
        self.next_id = 0
        self.rounds = 0

    @rule(enc_len=st.integers(1, MAX_IN), max_new=st.integers(1, MAX_NEW), prefix=st.integers(1, 4),
          eos=st.none() | st.integers(1, MAX_NEW), width=st.sampled_from([1, 1, 1, 2, 3]),
          key=st.none() | st.integers(0, 2), prefill=st.booleans())
    def submit(self, enc_len, max_new, prefix, eos, width, key, prefill):
        steps = prefix - 1 + max_new
        if key is not None:  # requests of one input have one encoder length
            enc_len = 3 + 7 * key
        bucket = next(b for b in BUCKETS if b >= enc_len)
        input_key = None if key is None else ("input", key)
        spec = SeqSpec(self.next_id, enc_len, bucket, steps, width, input_key, prefix - 1 if prefill else 0)
        self.next_id += 1
        try:
            self.sched.add(spec)
        except NeverFits:
            too_wide = width > self.config.num_slots
            assert too_wide or width * pages_for(steps, PAGE) > self.sched.self_alloc.capacity
            return
        ends = steps if eos is None else min(steps, prefix - 1 + eos)
        self.sims[spec.rid] = Sim(spec, ends)

    @rule(data=st.data())
    def cancel(self, data):
        live = sorted(r for r in self.sims if r not in self.finished | self.cancelled)
        if not live:
            return
        rid = data.draw(st.sampled_from(live))
        holding = [i for i, r in enumerate(self.sched.slots) if r == rid]
        slots = self.sched.cancel(rid)
        assert sorted(slots) == holding
        assert rid not in self.sched.slots and rid not in set(self.sched.queued())
        self.cancelled.add(rid)

    @rule(rounds=st.integers(1, 3))
    def step(self, rounds):
        for _ in range(rounds):
            self._round()

    def _round(self):
        c, sched = self.config, self.sched
        queue_before = list(sched.queued())
        slots_before = list(sched.slots)
        busy_before = [s for s in slots_before if s is not None]
        plan = sched.schedule()
        self.rounds += 1
        for rid in plan.preempted:  # it starts over (replaying its tokens) when admitted again
            assert rid in self.sims and rid in set(sched.queued())
            self.sims[rid].dispatched = self.sims[rid].done = 0
            queue_before.insert(0, rid)
        queue_before = list(dict.fromkeys(queue_before))
        admitted = [a.rid for a in plan.admitted]
        if plan.preempted:
            assert not set(admitted) & set(plan.preempted), "a preempted request resumes next round"
            queue_before = [r for r in queue_before if r not in plan.preempted]
        assert admitted == queue_before[: len(admitted)], "admission is FIFO"
        if admitted and c.mode == "static":
            assert not busy_before, "static mode admits into an all-free batch only"
        encoded = [a.rid for a in plan.admitted if a.encode]  # shared inputs cost no encode
        if c.mode == "inflight" and busy_before and len(encoded) > 1:
            # The first encode of a round may exceed the budget alone (or nothing long would
            # ever start); together, the encodes fit it.
            assert sum(self.sims[r].spec.bucket for r in encoded) <= c.encoder_budget
        for a in plan.admitted:
            spec = self.sims[a.rid].spec
            # An encoded start runs its prefill in the encode step; a shared one steps through it.
            assert a.prefilled == (spec.prefill if a.encode else 0)
            self.sims[a.rid].dispatched = self.sims[a.rid].done = a.prefilled
            assert len(a.slots) == len(a.self_pages) == spec.width
            assert all(plan.owners[i] == a.rid and slots_before[i] is None for i in a.slots)
            need_self, need_cross = sched.pages_needed(spec)
            if c.kv_allocation == "reserve":
                assert [len(p) for p in a.self_pages] == [need_self] * spec.width
            assert len(a.cross_pages) == need_cross
        held = [r for r in plan.owners if r is not None]
        owners = list(dict.fromkeys(held))
        assert all(held.count(r) == self.sims[r].spec.width for r in owners)
        if not owners:
            assert plan.num_steps == 0
        else:
            remaining = [self.sims[r].spec.decode_steps - self.sims[r].dispatched for r in owners]
            assert 1 <= plan.num_steps <= min(c.steps_per_dispatch, max(remaining))
            if c.mode == "inflight" and sched.num_queued and c.dispatch_overhead == 0:
                assert plan.num_steps <= min(remaining), "a dispatch runs past a budget while requests wait"
        for rid in owners:  # every slot has pages for every position this dispatch writes
            if rid in sched._running and not sched.is_draining(rid):
                run = sched._running[rid]
                stored = min(run.prefilled + run.steps_dispatched, run.spec.decode_steps)
                assert all(len(p) >= pages_for(stored, PAGE) for p in run.self_pages)
        ended = []
        for rid in owners:  # the device runs the dispatch
            sim = self.sims[rid]
            sim.dispatched += plan.num_steps
            if sim.ended:
                continue  # ended at EOS in the previous dispatch, not read yet: its slot idles
            sim.done = min(sim.ends_at, sim.done + plan.num_steps)
            if sim.done >= sim.ends_at:
                sim.ended = True
                ended.append(rid)
        for rid in plan.handed_on:
            assert self.sims[rid].ended, f"request {rid} was handed on but does not end in this dispatch"
        for rid in self.reported:  # the previous dispatch's results are read
            if rid not in self.cancelled:
                sched.finish(rid)
                self.finished.add(rid)
        self.reported = ended

    @invariant()
    def slots_and_pages_are_owned_once(self):
        s = self.sched
        held = [r for r in s.slots if r is not None]
        holders = list(dict.fromkeys(held))
        assert all(held.count(r) == self.sims[r].spec.width for r in holders)
        assert set(holders).isdisjoint(s.queued())
        self_pages = [p for r in holders for p in s.pages_of(r)[0]]
        entries = {s.pages_of(r)[1] for r in holders}  # one input: one set of cross pages
        cross_pages = [p for pages in entries for p in pages]
        assert len(set(self_pages)) == len(self_pages) and len(set(cross_pages)) == len(cross_pages)
        idle = s.cross_cache.idle_pages
        assert s.self_alloc.num_used == len(self_pages) and s.cross_alloc.num_used == len(cross_pages) + idle
        s.self_alloc.check_invariants()
        s.cross_alloc.check_invariants()

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for _ in range(10 * (len(self.sims) + 2) * (MAX_NEW + 2)):
            if not self.sched.has_work() and not self.reported:
                break
            self._round()
        assert not self.sched.has_work() and not self.reported, "a request starved"
        assert self.finished | self.cancelled == set(self.sims)
        self.sched.cross_cache.clear_idle()
        assert self.sched.self_alloc.num_used == 0 and self.sched.cross_alloc.num_used == 0
        assert self.sched.num_running == 0 and self.sched.num_queued == 0


def test_scheduler_invariants_without_a_model():
    SchedulerMachine.TestCase.settings = settings(
        max_examples=300,
        stateful_step_count=40,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    SchedulerMachine.TestCase().runTest()


def test_encoder_budget_spreads_a_burst_over_dispatches():
    config = EngineConfig(
        num_slots=8, page_size=PAGE, max_encoder_len=MAX_IN, max_new_tokens=MAX_NEW,
        encoder_buckets=BUCKETS, encoder_tokens_per_dispatch=40, max_encoder_tokens=40,
    )
    sched = Scheduler(config, num_self_pages=100, num_cross_pages=100)
    sched.add(SeqSpec(0, 5, 8, MAX_NEW))
    first = sched.schedule()
    assert [a.rid for a in first.admitted] == [0]  # nothing decodes yet: no budget
    for rid in range(1, 8):
        sched.add(SeqSpec(rid, MAX_IN, 20, MAX_NEW))
    rounds = [len(sched.schedule().admitted) for _ in range(4)]
    assert rounds == [2, 2, 2, 1]  # 40 tokens a dispatch while slot 0 decodes: two 20-token rows
    # Without a budget (no slot decoding) a burst is admitted at once.
    idle = Scheduler(config, num_self_pages=100, num_cross_pages=100)
    for rid in range(8):
        idle.add(SeqSpec(rid, MAX_IN, 20, MAX_NEW))
    assert len(idle.schedule().admitted) == 8


def test_dispatch_length_weighs_idle_slots_against_the_dispatch_cost():
    # No overhead: stop where the first budget ends (the freed slot refills at once).
    assert dispatch_length([(1, 5), (1, 2), (1, 9)], 8, 0.0) == 2
    # A dispatch that costs a lot: run as long as any slot has work.
    assert dispatch_length([(1, 5), (1, 2), (1, 9)], 8, 1e6) == 8
    assert dispatch_length([(1, 3), (1, 2)], 8, 1e6) == 3
    # Overhead 1: 2 steps do 6 slot-steps in 3 units (2.0/unit), 3 steps 7 in 4, 8 steps 12 in 9.
    assert dispatch_length([(1, 2), (1, 2), (1, 10)], 8, 1.0) == 2
    # Slots count: a 4-beam group ending after 2 steps outweighs one long sequence.
    assert dispatch_length([(1, 2), (1, 8)], 8, 4.0) == 8
    assert dispatch_length([(4, 2), (1, 8)], 8, 4.0) == 2
    # 63 long sequences and one ending now: on a GPU-like overhead, do not stop for it.
    assert dispatch_length([(63, 100), (1, 1)], 8, 8.0) == 8
    assert dispatch_length([(63, 100), (1, 1)], 8, 0.0) == 1
