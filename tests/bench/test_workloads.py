"""Synthetic traces: deterministic per seed, lengths and arrivals from the configured distributions."""

import numpy as np
import pytest

from encdec.bench.config import LengthDist, WorkloadConfig
from encdec.bench.workloads import PROFILES, make_trace, resolve_lengths

RANGE = (3, 500)


def _wl(**kw):
    base = dict(name="w", num_requests=400, input_len=LengthDist("uniform", low=5, high=40),
                output_len=LengthDist("uniform", low=2, high=30))
    base.update(kw)
    return WorkloadConfig(**base)


def test_same_seed_same_trace_other_seed_other_trace():
    cfg = _wl(arrival="poisson", rate=5.0)
    assert make_trace(cfg, RANGE) == make_trace(cfg, RANGE)
    other = make_trace(_wl(arrival="poisson", rate=5.0, seed=1), RANGE)
    assert [r.input_ids for r in other.requests] != [r.input_ids for r in make_trace(cfg, RANGE).requests]


def test_arrival_process_does_not_change_the_requests():
    at_once, poisson = make_trace(_wl(), RANGE), make_trace(_wl(arrival="poisson", rate=3.0), RANGE)
    assert [(r.input_ids, r.output_len) for r in at_once.requests] == [
        (r.input_ids, r.output_len) for r in poisson.requests
    ]


def test_input_ids_are_ordinary_tokens():
    trace = make_trace(_wl(), RANGE)
    ids = np.concatenate([r.input_ids for r in trace.requests])
    assert ids.min() >= RANGE[0] and ids.max() < RANGE[1]
    assert len(np.unique(ids)) > 400  # spread over the range, not a constant


def test_fixed_lengths_are_exact():
    cfg = _wl(input_len=LengthDist("fixed", value=7), output_len=LengthDist("fixed", value=11))
    trace = make_trace(cfg, RANGE)
    assert {len(r.input_ids) for r in trace.requests} == {7}
    assert {r.output_len for r in trace.requests} == {11}
    assert trace.output_tokens == 11 * 400


def test_uniform_lengths_cover_their_inclusive_range():
    outs = [r.output_len for r in make_trace(_wl(num_requests=2000), RANGE).requests]
    assert min(outs) == 2 and max(outs) == 30
    assert abs(np.mean(outs) - 16) < 1.0


def test_loguniform_is_skewed_towards_short_with_a_long_tail():
    dist = LengthDist("loguniform", low=4, high=256)
    trace = make_trace(_wl(num_requests=4000, output_len=dist), RANGE)
    outs = np.array([r.output_len for r in trace.requests])
    assert outs.min() >= 4 and outs.max() <= 256 and outs.max() > 200
    assert np.median(outs) < 50 < outs.mean() + 20  # median near sqrt(4 * 256) = 32
    assert np.mean(outs < 16) == pytest.approx(np.log(16 / 4) / np.log(257 / 4), abs=0.03)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_set_both_distributions(profile):
    trace = make_trace(WorkloadConfig(name=profile, profile=profile, num_requests=300), RANGE)
    in_dist, out_dist = PROFILES[profile]
    ins = [len(r.input_ids) for r in trace.requests]
    outs = [r.output_len for r in trace.requests]
    assert in_dist.low <= min(ins) and max(ins) <= in_dist.high
    assert out_dist.low <= min(outs) and max(outs) <= out_dist.high


def test_profile_shapes():
    s = trace_stats("summarization")
    t = trace_stats("translation")
    m = trace_stats("mixed")
    assert s["input_len"]["mean"] > 3 * s["output_len"]["mean"]  # long in, short out
    assert t["input_len"]["max"] <= 64 and t["output_len"]["max"] <= 64
    assert m["output_len"]["max"] > 10 * m["output_len"]["min"]  # wide spread


def trace_stats(profile):
    return make_trace(WorkloadConfig(name=profile, profile=profile, num_requests=300), RANGE).summary()


def test_explicit_lengths_override_the_profile():
    cfg = WorkloadConfig(name="w", profile="summarization", output_len=LengthDist("fixed", value=3))
    in_dist, out_dist = resolve_lengths(cfg)
    assert in_dist == PROFILES["summarization"][0] and out_dist == LengthDist("fixed", value=3)


def test_poisson_arrivals():
    trace = make_trace(_wl(num_requests=3000, arrival="poisson", rate=20.0), RANGE)
    t = np.array([r.arrival_s for r in trace.requests])
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert np.diff(t).mean() == pytest.approx(1 / 20, rel=0.08)
    assert not trace.all_at_once
    assert make_trace(_wl(), RANGE).all_at_once


def test_input_cap_and_derived_traces():
    trace = make_trace(_wl(arrival="poisson"), RANGE, max_input_len=10)
    assert trace.max_input_len == 10
    capped = trace.capped(3)
    assert len(capped) == len(trace) and capped.max_output_len == 3 and capped.all_at_once
    assert [r.input_ids for r in capped.requests] == [r.input_ids for r in trace.requests]
    assert trace.head(5).requests == trace.requests[:5]


def test_empty_token_range_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        make_trace(_wl(), (5, 5))
