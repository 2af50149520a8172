"""Random arrivals, cancellations and lengths through a running engine: outputs equal the
reference, the scheduler's invariants hold throughout, and every page comes back."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from encdec.engine import Engine, Request
from tests.engine.test_engine import MAX_IN, MAX_NEW, _config, _reference, holds_no_pages

INPUTS = [
    tuple(np.random.default_rng(i).integers(3, 90, n).tolist()) for i, n in enumerate((1, 4, 9, 15, MAX_IN))
]


class EngineTrafficMachine(RuleBasedStateMachine):
    model = None  # set by the test from the session fixture

    @initialize(slots=st.integers(1, 4), tight=st.booleans(), incremental=st.booleans())
    def start(self, slots, tight, incremental):
        pages = (
            dict(num_self_pages=1 + 2 * -(-MAX_NEW // 4), num_cross_pages=1 + 2 * -(-MAX_IN // 4))
            if tight
            else {}
        )
        allocation = dict(kv_allocation="incremental", kv_reserve_pages=0) if incremental else {}
        self.engine = Engine(self.model, _config(num_slots=slots, **pages, **allocation))
        self.requests: dict[int, Request] = {}
        self.cancelled: set[int] = set()
        self.outputs: dict = {}  # outputs are handed over once: keep them

    @rule(which=st.integers(0, len(INPUTS) - 1), max_new=st.integers(1, MAX_NEW))
    def submit(self, which, max_new):
        req = Request(inputs=list(INPUTS[which]), max_new_tokens=max_new)
        self.requests[self.engine.submit(req)] = req

    @rule(data=st.data())
    def cancel(self, data):
        if self.requests:
            handle = data.draw(st.sampled_from(sorted(self.requests)))
            if handle not in self.outputs:
                out = self.engine.result(handle)
                if out is None:
                    self.cancelled.add(handle)
                    self.engine.cancel(handle)
                else:
                    self.outputs[handle] = out

    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            self.engine.step()

    @invariant()
    def pages_and_slots_are_owned_once(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        s = e.scheduler
        holders = [rid for rid in s.slots if rid is not None]
        assert len(set(holders)) == len(holders)
        holders = list(dict.fromkeys(holders))  # a request is listed once (its group's slots)
        self_pages = [p for rid in holders for p in s.pages_of(rid)[0]]
        entries = {s.pages_of(rid)[1] for rid in holders}  # requests with one input share pages
        cross_pages = [p for pages in entries for p in pages]
        assert len(set(self_pages)) == len(self_pages) and len(set(cross_pages)) == len(cross_pages)
        idle = s.cross_cache.idle_pages
        assert e.self_alloc.num_used == len(self_pages) and e.cross_alloc.num_used == len(cross_pages) + idle
        assert set(holders).isdisjoint(s.queued())
        e.self_alloc.check_invariants()
        e.cross_alloc.check_invariants()

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        self.engine.run_until_idle()
        assert holds_no_pages(self.engine)
        for handle, req in self.requests.items():
            out = self.outputs.get(handle) or self.engine.result(handle)
            assert out is not None, "a waiting request starved"
            if handle in self.cancelled:
                assert out.finish_reason == "cancelled"
            else:
                assert out.token_ids == _reference("t5", self.model, tuple(req.inputs), req.max_new_tokens)
        assert self.engine.stats().tracked_requests == 0


def test_engine_invariants_under_random_traffic(tiny_models):
    EngineTrafficMachine.model = tiny_models["t5"]
    EngineTrafficMachine.TestCase.settings = settings(
        max_examples=12,
        stateful_step_count=20,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    EngineTrafficMachine.TestCase().runTest()
