"""Random arrivals, cancellations and lengths through the scheduler; its invariants hold throughout."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from encdec.engine import Engine, EngineConfig, Request
from tests.engine.test_engine import MAX_IN, MAX_NEW, _reference

INPUTS = [
    tuple(np.random.default_rng(i).integers(3, 90, n).tolist()) for i, n in enumerate((1, 4, 9, 15, MAX_IN))
]


class SchedulerMachine(RuleBasedStateMachine):
    model = None  # set by the test from the session fixture

    @initialize(slots=st.integers(1, 4), tight=st.booleans())
    def start(self, slots, tight):
        pages = (
            dict(num_self_pages=1 + 2 * -(-MAX_NEW // 4), num_cross_pages=1 + 2 * -(-MAX_IN // 4))
            if tight
            else {}
        )
        self.engine = Engine(
            self.model,
            EngineConfig(
                num_slots=slots,
                page_size=4,
                max_encoder_len=MAX_IN,
                max_new_tokens=MAX_NEW,
                encoder_buckets=(8, 16),
                steps_per_dispatch=2,
                attention_impl="xla",
                max_encoder_batch=4,
                **pages,
            ),
        )
        self.requests: dict[int, Request] = {}
        self.cancelled: set[int] = set()

    @rule(which=st.integers(0, len(INPUTS) - 1), max_new=st.integers(1, MAX_NEW))
    def submit(self, which, max_new):
        req = Request(inputs=list(INPUTS[which]), max_new_tokens=max_new)
        self.requests[self.engine.submit(req)] = req

    @rule(data=st.data())
    def cancel(self, data):
        if self.requests:
            handle = data.draw(st.sampled_from(sorted(self.requests)))
            if self.engine.result(handle) is None:
                self.cancelled.add(handle)
            self.engine.cancel(handle)

    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            self.engine.step()

    @invariant()
    def pages_and_slots_are_owned_once(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        holders = [e._live[rid] for rid in e._slots if rid is not None]
        assert len({h.rid for h in holders}) == len(holders)
        self_pages = [p for h in holders for p in h.self_pages]
        cross_pages = [p for h in holders for p in h.cross_pages]
        assert len(set(self_pages)) == len(self_pages) and len(set(cross_pages)) == len(cross_pages)
        assert e.self_alloc.num_used == len(self_pages) and e.cross_alloc.num_used == len(cross_pages)
        assert all(e._live[rid].slot is None for rid in e._queue)
        e.self_alloc.check_invariants()
        e.cross_alloc.check_invariants()

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        self.engine.run_until_idle()
        assert self.engine.self_alloc.num_used == 0 and self.engine.cross_alloc.num_used == 0
        for handle, req in self.requests.items():
            out = self.engine.result(handle)
            assert out is not None, "a waiting request starved"
            if handle in self.cancelled:
                assert out.finish_reason == "cancelled"
            else:
                assert out.token_ids == _reference("t5", self.model, tuple(req.inputs), req.max_new_tokens)


def test_scheduler_invariants_under_random_traffic(tiny_models):
    SchedulerMachine.model = tiny_models["t5"]
    SchedulerMachine.TestCase.settings = settings(
        max_examples=12,
        stateful_step_count=20,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    SchedulerMachine.TestCase().runTest()
