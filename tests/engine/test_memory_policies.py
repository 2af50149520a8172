"""Pages as tokens arrive, preemption under pressure, and cross-KV reuse: same outputs, less memory.

Every output here is compared with the same request on an engine with plenty of reserved pages
and no sharing (the old behaviour), which ``test_engine.py`` holds to the reference generator.
"""

import dataclasses

import numpy as np
import pytest

from encdec.cache.allocator import pages_for
from encdec.engine import Engine, Request
from tests.engine.test_engine import MAX_IN, MAX_NEW, _config, _requests, holds_no_pages
from tests.engine.test_engine_lora import _adapter


def _baseline(model, requests):
    engine = Engine(model, _config(cross_kv_reuse=False))
    return engine.generate(requests)


def _early_stoppers(model, n, seed):
    """Requests that stop early: each stops at a token its greedy output reaches in 1 to 4 steps."""
    requests = _requests(n, seed)
    long = [dataclasses.replace(r, max_new_tokens=MAX_NEW) for r in requests]
    outs = _baseline(model, long)
    stoppers = []
    for i, (req, out) in enumerate(zip(long, outs, strict=True)):
        at = min(1 + i % 4, len(out.token_ids))
        stoppers.append(dataclasses.replace(req, stop_token_ids=[out.token_ids[at - 1]]))
    return stoppers


def test_incremental_pages_fit_more_sequences_with_the_same_outputs(tiny_models):
    model = tiny_models["t5"]
    requests = _early_stoppers(model, 48, 3)
    full = pages_for(MAX_NEW, 4)  # a whole budget of self pages (page size 4)
    budget = dict(num_slots=8, num_self_pages=1 + 2 * full, cross_kv_reuse=False)  # two full sequences
    reserve = Engine(model, _config(**budget))
    incremental = Engine(model, _config(**budget, kv_allocation="incremental", kv_reserve_pages=1))
    want = [o.token_ids for o in _baseline(model, requests)]
    for engine in (reserve, incremental):
        outs = engine.generate(requests)
        assert [o.token_ids for o in outs] == want
        assert holds_no_pages(engine)
    r, i = reserve.stats(), incremental.stats()
    assert max(b for _, b in i.slot_occupancy) >= 2 * max(b for _, b in r.slot_occupancy)
    assert i.mean_busy_slots >= 2 * r.mean_busy_slots, (i.mean_busy_slots, r.mean_busy_slots)
    assert i.dispatches < r.dispatches


@pytest.mark.parametrize("sampled", [False, True])
def test_preempted_requests_resume_with_their_unpreempted_output(tiny_models, sampled):
    model = tiny_models["bart"]
    extra = dict(temperature=1.1, top_k=30, seed=5) if sampled else {}
    requests = [dataclasses.replace(r, max_new_tokens=MAX_NEW, **extra) for r in _requests(16, 9)]
    requests += [Request([5, 9, 12], max_new_tokens=MAX_NEW, temperature=1.3, seed=2, num_return_sequences=2)]
    tight = Engine(
        model,
        _config(num_slots=4, num_self_pages=1 + 2 * pages_for(MAX_NEW, 4), kv_allocation="incremental",
                kv_reserve_pages=0, steps_per_dispatch=2),
    )
    outs = tight.generate(requests)
    want = _baseline(model, requests)
    assert tight.stats().preemptions > 0
    for out, base in zip(outs, want, strict=True):
        assert [s.token_ids for s in out.sequences] == [s.token_ids for s in base.sequences]
    assert holds_no_pages(tight) and tight.stats().tracked_requests == 0


def test_repeated_inputs_share_cross_pages_and_skip_the_encoder(tiny_models):
    model = tiny_models["t5"]
    rng = np.random.default_rng(4)
    docs = [rng.integers(3, 90, int(n)).tolist() for n in (MAX_IN, 13, 7, 17)]
    news = rng.integers(2, MAX_NEW, 64)
    requests = [Request(docs[i % 4], max_new_tokens=int(news[i]), min_new_tokens=1) for i in range(64)]
    engine = Engine(model, _config(num_slots=8))
    outs = engine.generate(requests)
    stats = engine.stats()
    assert stats.cross_reuse_lookups == 64 and stats.cross_reuse_hits == 60
    assert stats.cross_reuse_hit_rate == pytest.approx(60 / 64)
    assert stats.peak_cross_pages == sum(pages_for(len(d), 4) for d in docs)  # the cross pages of 4
    encoded = 64 - stats.cross_reuse_hits
    assert encoded == 4
    want = _baseline(model, requests)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert stats.cross_pages_used == 0 and stats.cross_idle_pages == stats.peak_cross_pages
    # Kept idle, the pages serve a later request with no encode; an eviction-free pool stays exact.
    again = engine.generate([requests[0]])[0]
    assert again.token_ids == want[0].token_ids and engine.stats().cross_reuse_hits == 61
    bounded = Engine(model, _config(num_slots=8, cross_cache_pages=0))
    bounded.generate(requests[:8])
    assert bounded.stats().cross_idle_pages == 0


def test_adapters_never_share_and_a_reloaded_adapter_is_encoded_again(tiny_models):
    from encdec.lora import AdapterBank

    model = tiny_models["t5"]
    targets = ("q", "k", "v", "o")
    bank = AdapterBank(model.params, model.config, capacity=2, max_rank=2, target_modules=targets)
    engine = Engine(model, _config(num_slots=4), adapters=bank)
    engine.load_adapter("a", _adapter(model, 1, 2, targets))
    doc = [5, 17, 33, 40, 9]
    outs = engine.generate([Request(doc, max_new_tokens=6, adapter_id=a) for a in (None, "a", "a", None)])
    assert engine.stats().cross_reuse_hits == 2  # a with a, base with base: never across
    assert outs[0].token_ids == outs[3].token_ids and outs[1].token_ids == outs[2].token_ids
    engine.load_adapter("a", _adapter(model, 7, 2, targets))  # replaced: its cached pages are stale
    fresh = Engine(model, _config(num_slots=4, cross_kv_reuse=False), adapters=bank)
    want = fresh.generate([Request(doc, max_new_tokens=6, adapter_id="a")])[0]
    got = engine.generate([Request(doc, max_new_tokens=6, adapter_id="a")])[0]
    assert got.token_ids == want.token_ids and engine.stats().cross_reuse_hits == 2
