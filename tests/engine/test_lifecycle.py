"""The engine forgets a request once its output is handed over, so a long run stays flat.

``ENCDEC_LIFECYCLE_REQUESTS`` (default 2,000) requests go through ``generate``, ``stream`` (a
third of the streams abandoned after two tokens) and ``submit`` + ``result``; afterwards the
engine tracks nothing, holds no page, and host memory (tracemalloc, after a warm-up third)
has not grown with the number of requests served.
"""

import gc
import os
import tracemalloc

import numpy as np
import pytest

from encdec.engine import Engine, Request
from tests.engine.test_engine import MAX_IN, MAX_NEW, _config

TOTAL = int(os.environ.get("ENCDEC_LIFECYCLE_REQUESTS", "2000"))
# Host memory may grow this much per request of the last part (measured: ~20-26 bytes, the
# tables of the engine's dicts and sets after their peak): a request's output, handle or
# stream left behind is hundreds of bytes.
GROWTH_PER_REQUEST = 100


def _rss_mb() -> float | None:
    """Resident memory now (Linux), for the printed figure only."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def _traffic(engine, rng, n):
    """``n`` requests, a third each way; returns how many streams were abandoned."""
    def request():
        length = int(rng.integers(1, MAX_IN + 1))
        ids = rng.integers(3, 90, length).tolist()
        return Request(inputs=ids, max_new_tokens=int(rng.integers(2, MAX_NEW)))

    abandoned = 0
    third = n // 3
    outputs = engine.generate([request() for _ in range(third)])
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    for i in range(third):
        stream = engine.stream(request())
        if i % 3 == 0:
            for _, _ in zip(range(2), stream, strict=False):
                pass
            stream.close()
            abandoned += 1
        else:
            tokens = list(stream)
            assert stream.output is not None and tokens == stream.output.token_ids
    handles = [engine.submit(request()) for _ in range(n - 2 * third)]
    engine.run_until_idle()
    for h in handles:
        assert engine.result(h).finish_reason in ("stop", "length")
    return abandoned


def test_many_requests_leave_nothing_behind(tiny_models):
    engine = Engine(tiny_models["t5"], _config(num_slots=8, steps_per_dispatch=4))
    engine.warmup()
    rng = np.random.default_rng(0)
    _traffic(engine, rng, max(30, TOTAL // 10))  # compiles, caches and pools reach their size
    gc.collect()
    rss_start = _rss_mb()
    tracemalloc.start()
    try:
        _traffic(engine, rng, TOTAL // 3)
        gc.collect()
        middle, _ = tracemalloc.get_traced_memory()
        rss_middle = _rss_mb()
        abandoned = _traffic(engine, rng, TOTAL - TOTAL // 3 - max(30, TOTAL // 10))
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stats = engine.stats()
    assert abandoned > 0
    assert stats.tracked_requests == 0 and stats.queued_requests == 0 and stats.running_requests == 0
    assert stats.self_pages_used == 0 and stats.cross_pages_used == 0
    growth = end - middle
    last = TOTAL - TOTAL // 3 - max(30, TOTAL // 10)
    print(
        f"lifecycle: {TOTAL} requests, traced host memory {middle / 1e6:.2f} -> {end / 1e6:.2f} MB "
        f"over the last {last}; RSS {rss_start} -> {rss_middle} -> {_rss_mb()} MB"
    )
    assert growth < GROWTH_PER_REQUEST * last, f"host memory grew {growth / 1e6:.2f} MB over the last {last}"


def test_an_abandoned_stream_frees_its_slot_at_once(tiny_models):
    engine = Engine(tiny_models["t5"], _config(num_slots=1))
    stream = engine.stream(Request(inputs=[5, 6, 7], max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW))
    next(stream)
    next(stream)
    assert engine.stats().self_pages_used > 0
    del stream  # dropped without close: the finalizer cancels it
    gc.collect()
    stats = engine.stats()
    assert (stats.tracked_requests, stats.self_pages_used, stats.cross_pages_used) == (0, 0, 0)
    # A stream never started holds its request until dropped, then lets it go too.
    unstarted = engine.stream(Request(inputs=[5, 6], max_new_tokens=4))
    assert engine.stats().tracked_requests == 1
    del unstarted
    gc.collect()
    assert engine.stats().tracked_requests == 0
    out = engine.generate([Request(inputs=[5, 6, 7], max_new_tokens=3)])[0]
    assert out.finish_reason in ("stop", "length")


def test_handles_are_never_reused_and_outputs_are_handed_over_once(tiny_models):
    engine = Engine(tiny_models["t5"], _config())
    first = engine.submit(Request(inputs=[5, 6], max_new_tokens=3))
    engine.run_until_idle()
    assert engine.result(first) is not None
    with pytest.raises(KeyError, match="handed over"):
        engine.result(first)
    outputs = engine.generate([Request(inputs=[5, 6], max_new_tokens=3), Request(inputs=[])])
    second = engine.submit(Request(inputs=[5, 6], max_new_tokens=3))
    ids = [first, outputs[0].request_id, outputs[1].request_id, second]
    assert len(set(ids)) == 4 and ids == sorted(ids)
    assert outputs[1].finish_reason == "error" and "input is empty" in outputs[1].error
    assert engine.cancel(second) and not engine.cancel(second)
    assert engine.result(second).finish_reason == "cancelled"
    assert engine.stats().tracked_requests == 0
    assert engine.stats().to_dict()["tracked_requests"] == 0  # JSON-ready


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory mappings")
def test_clear_compiled_releases_what_engines_compiled(tiny_models):
    """Every engine configuration's executables stay mapped after the engine is gone (XLA:CPU maps
    each one's code); a bench of 20 runs hit ``vm.max_map_count``. ``clear_compiled`` lets them
    go, and an engine built before it still decodes."""
    from encdec.engine import clear_compiled

    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    clear_compiled()
    gc.collect()
    before = mappings()
    for slots in (2, 3):
        engine = Engine(tiny_models["t5"], _config(num_slots=slots))
        engine.generate([Request(inputs=[5, 6, 7], max_new_tokens=3)])
    grown = mappings() - before
    clear_compiled()
    gc.collect()
    assert grown > 200 and mappings() - before < grown / 4, (before, grown, mappings())
    out = engine.generate([Request(inputs=[5, 6, 7], max_new_tokens=3, min_new_tokens=3)])
    assert len(out[0].token_ids) == 3
