"""The engine against the reference generator, and its bookkeeping invariants."""

import numpy as np
import pytest

import encdec
from encdec.engine import Engine, EngineConfig, Request, RequestError

MAX_IN, MAX_NEW = 20, 12


def holds_no_pages(engine) -> bool:
    """No page is held once the idle cross-page cache is emptied (every allocation accounted)."""
    engine.scheduler.cross_cache.clear_idle()
    return engine.self_alloc.num_used == 0 and engine.cross_alloc.num_used == 0


def _config(**kw):
    base = dict(
        num_slots=8,
        page_size=4,
        max_encoder_len=MAX_IN,
        max_new_tokens=MAX_NEW,
        encoder_buckets=(8, 16),
        steps_per_dispatch=2,
        attention_impl="xla",
        max_encoder_batch=4,
    )
    base.update(kw)
    return EngineConfig(**base)


def _requests(n, rng_seed=0, vocab=90, **kw):
    rng = np.random.default_rng(rng_seed)
    lengths = np.concatenate([[1, MAX_IN], rng.integers(1, MAX_IN + 1, n - 2)])
    news = np.concatenate([[MAX_NEW, 1], rng.integers(1, MAX_NEW + 1, n - 2)])
    return [
        Request(inputs=rng.integers(3, vocab, int(s)).tolist(), max_new_tokens=int(m), **kw)
        for s, m in zip(lengths, news, strict=True)
    ]


_REFERENCE_CACHE: dict = {}


def _reference(model_key, model, inputs, max_new):
    """Greedy ``reference_generate`` of one request alone (memoized across tests).

    Greedy output for ``max_new`` tokens is the prefix of the output for ``MAX_NEW``, so one
    reference run per input serves every ``max_new``; padding to a multiple of 8 (masked) keeps
    the reference's compilations few.
    """
    key = (model_key, inputs)
    if key not in _REFERENCE_CACHE:
        out = encdec.reference_generate(model, [list(inputs)], MAX_NEW, pad_to_multiple=8)[0]
        _REFERENCE_CACHE[key] = out.token_ids
    return _REFERENCE_CACHE[key][:max_new]


@pytest.mark.parametrize("impl", ["xla", "window"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_64_mixed_requests_through_8_slots_equal_reference_alone(tiny_models, family, impl):
    model = tiny_models[family]
    requests = _requests(64, 1)
    engine = Engine(model, _config(attention_impl=impl))
    outputs = engine.generate(requests)
    for req, out in zip(requests, outputs, strict=True):
        assert out.token_ids == _reference(family, model, tuple(req.inputs), req.max_new_tokens), req
        assert out.finish_reason in ("stop", "length")
        assert (
            out.timings["arrival"]
            <= out.timings["admitted"]
            <= out.timings["first_token"]
            <= out.timings["done"]
        )
    stats = engine.stats()
    assert stats.self_pages_used == 0 and stats.cross_pages_used == 0
    assert min(stats.slot_fills) >= 4  # every slot reused many times
    engine.self_alloc.check_invariants()
    engine.cross_alloc.check_invariants()


def test_sampling_is_batch_invariant(tiny_models):
    model = tiny_models["t5"]
    target = Request(
        inputs=[5, 9, 17, 33, 2], max_new_tokens=MAX_NEW, temperature=1.3, top_k=20, top_p=0.9, seed=7
    )
    alone = Engine(model, _config()).generate([target])[0].token_ids
    crowd = _requests(20, 3, temperature=0.8, seed=11)
    mixed = Engine(model, _config()).generate(crowd[:9] + [target] + crowd[9:])[9].token_ids
    assert alone == mixed
    reference = encdec.reference_generate(
        model, [target.inputs], MAX_NEW, temperature=1.3, top_k=20, top_p=0.9, seed=7
    )[0].token_ids
    assert alone == reference
    # A different seed gives a different sample (the test would pass vacuously otherwise).
    other = Engine(model, _config()).generate([Request(**{**target.__dict__, "seed": 8})])[0].token_ids
    assert other != alone


def test_dispatch_overhead_gives_fewer_dispatches_and_the_same_tokens(tiny_models):
    model = tiny_models["t5"]
    requests = _requests(24, 7)
    runs = {}
    for overhead in (0, 100):
        engine = Engine(model, _config(steps_per_dispatch=4, dispatch_overhead_steps=overhead))
        runs[overhead] = ([o.token_ids for o in engine.generate(requests)], engine.stats().dispatches)
    assert runs[100][0] == runs[0][0]
    assert runs[100][1] < runs[0][1]


def test_no_recompilation_after_warmup(tiny_models):
    model = tiny_models["bart"]
    engine = Engine(model, _config(steps_per_dispatch=3))
    before = engine.compile_counts()  # the jitted steps are shared by engines of one model config
    warm = engine.warmup()
    # At most one decode and one release; per bucket (8, 16, 20) one encode per batch size 1, 2, 4;
    # one shared-input start per batch size 1, 2, 4, 8.
    assert warm["decode"] - before["decode"] <= 1 and warm["decode"] >= 1
    assert warm["release"] - before["release"] <= 1
    assert warm["encode"] - before["encode"] <= 3 * len(engine.config.encoder_buckets)
    assert warm["insert"] - before["insert"] <= 4
    requests = _requests(300, 5)
    engine.generate(requests + requests[:40])  # repeated inputs share cross pages
    assert engine.compile_counts() == warm
    assert min(engine.stats().slot_fills) >= 30


def test_static_mode_matches_and_waits_for_the_whole_batch(tiny_models):
    model = tiny_models["t5"]
    requests = _requests(24, 6)
    inflight = Engine(model, _config(mode="inflight")).generate(requests)
    static_engine = Engine(model, _config(mode="static"))
    static = static_engine.generate(requests)
    assert [o.token_ids for o in static] == [o.token_ids for o in inflight]
    # Static batches start together: 24 requests / 8 slots = 3 fills of every slot, no more.
    assert static_engine.stats().slot_fills == (3,) * 8


def test_slots_ending_by_length_are_refilled_without_an_idle_dispatch(tiny_models):
    # Each request decodes exactly 4 tokens = 2 dispatches of 2 steps. Its slot is handed on when
    # its last dispatch is issued, so 6 requests through 2 slots take 3 x 2 = 6 dispatches; waiting
    # to read the end first would cost a third, empty dispatch per request.
    model = tiny_models["t5"]
    requests = [Request(inputs=r.inputs, max_new_tokens=4, min_new_tokens=4) for r in _requests(6, 12)]
    engine = Engine(model, _config(num_slots=2))
    outputs = engine.generate(requests)
    stats = engine.stats()
    assert stats.dispatches == 6 and stats.early_releases == 6
    assert stats.slot_fills == (3, 3)
    for req, out in zip(requests, outputs, strict=True):
        assert out.finish_reason == "length" and len(out.token_ids) == 4
        ref = encdec.reference_generate(model, [req.inputs], 4, min_new_tokens=4)[0].token_ids
        assert out.token_ids == ref
    assert holds_no_pages(engine)


def test_dispatches_end_where_a_budget_ends_so_no_slot_idles(tiny_models):
    # FIFO list scheduling on 2 slots, lengths 3 5 2 4 6 1: slot A runs r0 (0-3), r2 (3-5),
    # r3 (5-9), r5 (9-10); slot B runs r1 (0-5), r4 (5-11). Dispatches of at most 4 steps cut
    # at every budget end take exactly 11 steps; fixed 4-step dispatches would take 16.
    model = tiny_models["bart"]
    lengths = [3, 5, 2, 4, 6, 1]
    requests = [
        Request(inputs=r.inputs, max_new_tokens=n, min_new_tokens=n)
        for r, n in zip(_requests(6, 14), lengths, strict=True)
    ]
    engine = Engine(model, _config(num_slots=2, steps_per_dispatch=4))
    outputs = engine.generate(requests)
    assert engine.stats().decode_steps == 11
    for req, out, n in zip(requests, outputs, lengths, strict=True):
        ref = encdec.reference_generate(model, [req.inputs], n, min_new_tokens=n)[0].token_ids
        assert out.token_ids == ref


def test_cancelling_a_draining_request_leaves_its_successor_alone(tiny_models):
    model = tiny_models["t5"]
    first, second = (Request(inputs=r.inputs, max_new_tokens=2, min_new_tokens=2) for r in _requests(2, 13))
    engine = Engine(model, _config(num_slots=1))
    h1, h2 = engine.submit(first), engine.submit(second)
    engine.step()  # first's only dispatch is issued: its slot is free for second already
    assert engine.scheduler.is_draining(h1) and engine.scheduler.slots == [None]
    engine.cancel(h1)  # neither queued nor holding a slot
    engine.run_until_idle()
    assert engine.result(h1).finish_reason == "cancelled"
    ref = encdec.reference_generate(model, [second.inputs], 2, min_new_tokens=2)[0].token_ids
    assert engine.result(h2).token_ids == ref
    assert holds_no_pages(engine)


def test_cancel_returns_pages_and_keeps_others_going(tiny_models):
    model = tiny_models["t5"]
    engine = Engine(model, _config(num_slots=2))
    handles = [engine.submit(r) for r in _requests(6, 8)]
    engine.step()
    engine.step()
    engine.cancel(handles[0])  # running
    engine.cancel(handles[5])  # still queued
    engine.run_until_idle()
    assert engine.result(handles[0]).finish_reason == "cancelled"
    assert engine.result(handles[5]).finish_reason == "cancelled"
    for h in handles[1:5]:
        req = _requests(6, 8)[h]
        assert engine.result(h).token_ids == _reference("t5", model, tuple(req.inputs), req.max_new_tokens)
    assert holds_no_pages(engine)


def test_stream_yields_the_tokens_of_generate(tiny_models):
    model = tiny_models["bart"]
    req = _requests(3, 9)[0]
    engine = Engine(model, _config())
    streamed = list(engine.stream(req))
    assert streamed == _reference("bart", model, tuple(req.inputs), req.max_new_tokens)


@pytest.mark.parametrize(
    ("request_kw", "message"),
    [
        ({"inputs": []}, "input is empty"),
        ({"inputs": list(range(3, 3 + MAX_IN + 1))}, "above max_encoder_len"),
        ({"inputs": [5, 96]}, "outside the vocabulary"),
        ({"inputs": [5], "max_new_tokens": 0}, "max_new_tokens"),
        ({"inputs": [5], "max_new_tokens": MAX_NEW + 1}, "max_new_tokens"),
        ({"inputs": [5], "temperature": -1.0}, "temperature"),
        ({"inputs": [5], "top_p": 0.0}, "top_p"),
        ({"inputs": [5], "top_p": 1.5}, "top_p"),
        ({"inputs": [5], "adapter_id": "nope"}, "unknown adapter id 'nope'"),
        ({"inputs": "text"}, "needs a tokenizer"),
    ],
)
def test_bad_requests_fail_alone(tiny_models, request_kw, message):
    model = tiny_models["t5"]
    engine = Engine(model, _config())
    good = _requests(4, 10)
    bad = Request(**{"max_new_tokens": 4, **request_kw})
    with pytest.raises(RequestError, match=message):
        engine.submit(bad)
    outputs = engine.generate(good[:2] + [bad] + good[2:])
    assert outputs[2].finish_reason == "error" and message.split()[0] in outputs[2].error
    for req, out in zip(good, outputs[:2] + outputs[3:], strict=True):
        assert out.token_ids == _reference("t5", model, tuple(req.inputs), req.max_new_tokens)


def test_truncation_and_never_fitting_requests(tiny_models):
    model = tiny_models["t5"]
    long_input = list(range(3, 3 + MAX_IN + 5))
    engine = Engine(model, _config(truncate_long_inputs=True))
    out = engine.generate([Request(inputs=long_input, max_new_tokens=4)])[0]
    assert out.token_ids == _reference("t5", model, tuple(long_input[:MAX_IN]), 4)
    small = Engine(model, _config(num_self_pages=3, num_cross_pages=40))
    with pytest.raises(RequestError, match="can never fit"):
        small.submit(Request(inputs=[5, 6], max_new_tokens=MAX_NEW))
    assert small.generate([Request(inputs=[5, 6], max_new_tokens=8)])[0].finish_reason in ("stop", "length")
