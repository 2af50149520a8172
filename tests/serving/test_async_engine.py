"""The asynchronous engine: one loop thread owns the engine; threads and asyncio tasks submit,
stream and cancel; failures stay with their request; a dead loop is reported."""

import asyncio
import concurrent.futures
import dataclasses
import threading
import time

import numpy as np
import pytest

import encdec
from encdec.engine import Request, RequestError
from encdec.engine.async_engine import AsyncEngine, EngineClosed, EngineDead, Overloaded
from encdec.lora import merge_adapter
from tests.engine.test_engine_lora import _adapter
from tests.serving.conftest import MAX_NEW, text_engine

LONG = Request("t5 t6 t7", max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)


def _requests(n, seed=0):
    """Mixed text requests: lengths, budgets, greedy and seeded sampling."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = " ".join(f"t{t}" for t in rng.integers(3, 500, int(rng.integers(1, 24))))
        sampled = i % 3 == 0
        out.append(
            Request(
                words,
                max_new_tokens=int(rng.integers(1, MAX_NEW + 1)),
                temperature=0.9 if sampled else 0.0,
                top_p=0.9 if sampled else 1.0,
                seed=i,
            )
        )
    return out


@pytest.fixture
def engine(text_model):
    return text_engine(text_model)


def _assert_idle(engine):
    s = engine.stats()
    assert (s.tracked_requests, s.self_pages_used, s.cross_pages_used) == (0, 0, 0)
    engine.self_alloc.check_invariants()
    engine.cross_alloc.check_invariants()


def _within(seconds, fn, *args):
    """``fn(*args)`` on another thread; fails the test instead of hanging it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(timeout=seconds)


def _wait_until(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _slow_steps(engine, seconds=0.01):
    """Rounds that take at least ``seconds``: a request of MAX_NEW tokens then lasts many of them."""
    real = engine.step

    def step():
        time.sleep(seconds)
        return real()

    engine.step = step


def test_eight_threads_submit_and_stream_against_one_engine(engine):
    requests = _requests(64, 1)
    expected = engine.generate(requests)  # offline, before the loop owns the engine
    assert len({tuple(o.token_ids) for o in expected}) > 40
    results: dict[int, tuple] = {}
    errors = []
    with AsyncEngine(engine, max_pending=128) as ae:
        start = threading.Barrier(8)

        def sync_worker(k):
            mine = list(range(k, len(requests), 8))
            up_front = [(i, ae.submit(requests[i])) for i in mine[::2]]  # streamed later, in turn
            for i in mine[1::2]:  # one at a time
                stream = ae.submit(requests[i])
                results[i] = (list(stream), stream)
            for i, stream in up_front:
                results[i] = (list(stream), stream)

        async def async_worker(k):
            async def one(i):
                stream = await ae.submit_async(requests[i])
                results[i] = ([d async for d in stream], stream)

            await asyncio.gather(*(one(i) for i in range(k, len(requests), 8)))

        def run(k):
            try:
                start.wait()
                asyncio.run(async_worker(k)) if k == 7 else sync_worker(k)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert ae.snapshot().pending == 0
    for i, want in enumerate(expected):
        deltas, stream = results[i]
        assert [t for d in deltas for t in d.token_ids] == want.token_ids, i
        assert "".join(d.text for d in deltas) == want.text == stream.text
        assert [d.output is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1].output.finish_reason == want.finish_reason
        assert stream.prompt_tokens == len(engine.model.tokenizer(requests[i].inputs)["input_ids"])
    _assert_idle(engine)


def test_a_full_engine_says_overloaded_and_recovers(engine):
    with AsyncEngine(engine, max_pending=2) as ae:
        a, b = ae.submit(LONG), ae.submit(LONG)
        with pytest.raises(Overloaded, match="max_pending=2"):
            ae.submit(LONG)
        assert a.result().finish_reason == b.result().finish_reason == "length"
        assert ae.submit(LONG).result().token_ids == a.output.token_ids
    _assert_idle(engine)


def test_bad_requests_fail_their_caller_alone(text_model):
    # Two usable self pages of 4 tokens: a request for 16 tokens can never fit (found on the loop).
    engine = text_engine(text_model, num_self_pages=3)
    with AsyncEngine(engine) as ae:
        running = ae.submit(Request("t5 t6 t7", max_new_tokens=6, min_new_tokens=6))
        with pytest.raises(RequestError, match="temperature must be in"):
            ae.submit(Request("t5", temperature=-1.0))
        with pytest.raises(RequestError, match="input is empty"):
            ae.submit(Request([], max_new_tokens=2))
        with pytest.raises(RequestError, match="can never fit"):
            ae.submit(Request("t5", max_new_tokens=MAX_NEW))
        with pytest.raises(RequestError, match="can never fit"):
            asyncio.run(ae.generate(Request("t5", max_new_tokens=MAX_NEW)))
        assert running.result().finish_reason == "length" and len(running.output.token_ids) == 6
        assert ae.snapshot().pending == 0
    _assert_idle(engine)


def test_cancelling_frees_the_slot_and_pages(engine):
    _slow_steps(engine)
    with AsyncEngine(engine) as ae:
        streams = [ae.submit(LONG) for _ in range(6)]  # 4 slots: two wait in the queue
        next(streams[0])
        for s in streams[::2]:
            s.cancel()
        outputs = [_within(30, s.result) for s in streams]
        assert [o.finish_reason for o in outputs] == ["cancelled", "length"] * 3
        assert all(len(o.token_ids) < MAX_NEW for o in outputs[::2])

        async def leave_early():  # a task that stops awaiting cancels its request
            task = asyncio.create_task(ae.generate(LONG))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(leave_early())
        _wait_until(lambda: ae.snapshot().pending == 0)
        assert ae.snapshot().finished["cancelled"] == 4
    _assert_idle(engine)


def test_a_consumer_whose_event_loop_closed_does_not_stop_the_loop(engine):
    _slow_steps(engine)
    with AsyncEngine(engine) as ae:
        loop = asyncio.new_event_loop()
        orphan = loop.run_until_complete(ae.submit_async(LONG))
        loop.close()  # its tokens can no longer be delivered
        assert ae.submit(Request("t8 t9", max_new_tokens=5)).result().finish_reason in ("stop", "length")
        _wait_until(lambda: ae.snapshot().pending == 0)
        assert ae.snapshot().finished.get("cancelled") == 1 and ae.alive
        del orphan
    _assert_idle(engine)


def test_a_dead_loop_is_reported_to_every_waiter(engine):
    real = engine.step

    def step():  # fails once two requests have produced tokens
        time.sleep(0.01)
        tracked = engine._tracked.values()
        if len(tracked) >= 2 and all(t.tokens for t in tracked):
            raise RuntimeError("device lost")
        return real()

    engine.step = step
    ae = AsyncEngine(engine)
    from_thread = ae.submit(LONG)

    async def from_task():
        stream = await ae.submit_async(LONG)
        with pytest.raises(EngineDead, match="device lost"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(from_task(), 30))
    with pytest.raises(EngineDead, match="RuntimeError: device lost"):
        _within(30, list, from_thread)
    assert not ae.alive and isinstance(ae.error, RuntimeError) and not ae.snapshot().alive
    with pytest.raises(EngineDead):
        ae.submit(LONG)
    with pytest.raises(EngineDead):
        ae.call(lambda e: e.stats()).result(timeout=5)
    ae.shutdown()  # returns at once: the loop has stopped


def test_shutdown_drains_or_cancels(engine):
    _slow_steps(engine)
    ae = AsyncEngine(engine)
    running = ae.submit(LONG)
    ae.shutdown(drain=True)
    assert running.result().finish_reason == "length"
    with pytest.raises(EngineClosed):
        ae.submit(LONG)
    ae = AsyncEngine(engine)
    running = ae.submit(LONG)
    next(running)
    ae.shutdown(drain=False)
    assert running.result().finish_reason == "cancelled"
    _assert_idle(engine)


def test_an_idle_loop_sleeps_and_wakes_for_work(engine):
    with AsyncEngine(engine) as ae:
        ae.submit(Request("t5", max_new_tokens=2)).result()
        time.sleep(0.05)
        rounds = ae.snapshot().rounds
        time.sleep(0.3)
        assert ae.snapshot().rounds == rounds  # no round ran while idle: it waits, not polls
        assert ae.submit(Request("t6", max_new_tokens=2)).result().finish_reason in ("stop", "length")
        assert ae.snapshot().rounds > rounds


def test_adapters_load_and_unload_between_rounds(text_model):
    engine = text_engine(text_model)
    lora = _adapter(text_model, 3, 2, ("q", "v"))
    request = Request("t40 t41 t42 t43", max_new_tokens=MAX_NEW, adapter_id="a")
    with AsyncEngine(engine) as ae:
        asyncio.run(ae.run(lambda e: e.load_adapter("a", lora)))
        stream = ae.submit(request)
        with pytest.raises(ValueError, match="in use"):
            ae.unload_adapter("a")
        output = stream.result()
        ae.unload_adapter("a")
        with pytest.raises(RequestError, match="unknown adapter id 'a'"):
            ae.submit(request)
    merged = dataclasses.replace(text_model, params=merge_adapter(text_model.params, lora))
    expected = encdec.reference_generate(merged, [request.inputs], MAX_NEW, pad_to_multiple=16)[0]
    base = encdec.reference_generate(text_model, [request.inputs], MAX_NEW, pad_to_multiple=16)[0]
    assert output.token_ids == expected.token_ids != base.token_ids
