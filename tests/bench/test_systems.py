"""Runners: HF generate and CTranslate2 match reference_generate token for token; static batching
and the scoring helpers do what they say on toys computed by hand."""

import time

import numpy as np
import pytest

import encdec
from encdec.bench import shapes
from encdec.bench.config import SYSTEMS, BaselineSection, LengthDist, WorkloadConfig
from encdec.bench.metrics import (
    SystemRun,
    TieCheck,
    compare_outputs,
    dense_kv_memory,
    reference_outputs,
    summarize,
)
from encdec.bench.systems import (
    CT2Translate,
    HFGenerate,
    available_systems,
    decode_step_times,
    run_static_batches,
    step_probe,
)
from encdec.bench.workloads import Trace, TraceRequest, make_trace
from encdec.config import ModelConfig
from encdec.engine import Request

CPU = BaselineSection(device="cpu", threads=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module", params=["tiny-t5", "tiny-bart", "tiny-nllb"])
def case(request, cache):
    """A shape, its checkpoint, a trace with varied lengths and the reference tokens."""
    name = request.param
    path = shapes.write_shape(name, cache_dir=cache)
    wl = WorkloadConfig(name="w", num_requests=7, input_len=LengthDist("uniform", low=2, high=20),
                        output_len=LengthDist("uniform", low=1, high=16), seed=5)
    trace = make_trace(wl, shapes.get_shape(name).token_range)
    reference = reference_outputs(encdec.load_pretrained(path, tokenizer=False), trace, chunk=4)
    return name, path, trace, reference


def test_reference_has_exact_lengths_and_varied_tokens(case):
    _, _, trace, reference = case
    assert [len(t) for t in reference] == [r.output_len for r in trace.requests]
    assert len({t for toks in reference for t in toks}) > 3


def test_hf_generate_matches_the_reference(case):
    _, path, trace, reference = case
    run = HFGenerate(path, "float32", CPU).run(trace, num_slots=3)
    assert compare_outputs(run.token_ids, reference)["outputs_match_reference"], (run.token_ids, reference)
    assert run.memory["estimated"] and 0 < run.memory["kv_utilization"] <= 1


@pytest.mark.parametrize("compute", ["float32", "int8_float32"])
def test_ctranslate2_matches_the_reference(case, cache, compute):
    pytest.importorskip("ctranslate2")
    name, _, trace, reference = case
    system = CT2Translate("ctranslate2", shapes.ct2_dir(name, cache_dir=cache), compute, CPU)
    run = system.run(trace, num_slots=3)
    result = compare_outputs(run.token_ids, reference)
    assert [len(t) for t in run.token_ids] == [r.output_len for r in trace.requests]
    if compute == "float32":
        assert result["outputs_match_reference"], (run.token_ids, reference)


def _toy_trace(lengths, arrivals=None):
    arrivals = arrivals or [0.0] * len(lengths)
    return Trace("toy", tuple(
        TraceRequest(i, (10 + i,), n, a) for i, (n, a) in enumerate(zip(lengths, arrivals, strict=True))
    ))


def test_static_batches_run_in_order_to_their_longest_request():
    calls = []

    def generate_batch(inputs, length):
        calls.append(([x[0] for x in inputs], length))
        return [[x[0]] * length for x in inputs]  # a toy: repeat the input token

    trace = _toy_trace([2, 5, 1, 3, 4])
    run = run_static_batches("toy", trace, 2, generate_batch)
    assert calls == [([10, 11], 5), ([12, 13], 3), ([14], 4)]
    assert run.token_ids == [[10, 10], [11] * 5, [12], [13] * 3, [14] * 4]
    # A batch's requests finish together; later batches finish later.
    assert run.latency_s[0] == run.latency_s[1] <= run.latency_s[2] == run.latency_s[3] <= run.latency_s[4]
    assert run.wall_s == pytest.approx(run.latency_s[4])


def test_step_probe_keeps_every_slot_busy():
    probe = step_probe(_toy_trace([3, 40, 7, 19, 100]), 4, Request)
    assert [r.inputs for r in probe] == [[10], [11], [12], [13]]  # the first requests' inputs
    # each to the longest of their lengths (not the fifth's): no slot idles before the end
    assert {(r.max_new_tokens, r.min_new_tokens) for r in probe} == {(40, 40)}


class _Unfinished:
    """A step's input still being computed (say, by the encoder); ``jax.block_until_ready``
    calls this."""

    def __init__(self, events: list[str]):
        self.events = events

    def block_until_ready(self):
        self.events.append("input ready")
        return self


class _ToyEngine:
    """What ``decode_step_times`` uses of an engine: a ``_decode`` that ``generate`` calls, and the
    count of steps run. Each dispatch runs 4 steps and sleeps ``sleeps[run][dispatch]``."""

    def __init__(self, events: list[str], sleeps: list[list[float]] | None = None):
        self.events, self.steps, self.runs = events, 0, 0
        self.sleeps = sleeps or [[0.0] * 3] * 8

    def _decode(self, pending, sleep_s=0.0):
        self.events.append("step")
        time.sleep(sleep_s)
        return 0

    def generate(self, requests):
        for sleep_s in self.sleeps[self.runs]:
            self._decode(_Unfinished(self.events), sleep_s)
            self.steps += 4
        self.runs += 1

    def stats(self):
        return type("Stats", (), {"decode_steps": self.steps})


def test_decode_step_times_waits_for_a_steps_inputs_before_its_clock():
    events: list[str] = []
    engine = _ToyEngine(events)
    jitted = engine._decode
    times = decode_step_times(engine, [Request(inputs=[1], max_new_tokens=4)], repeats=2)
    assert times is not None and 0 <= times.dispatch_ms <= times.run_ms
    # The encoder's unfinished work is not the step's: each input is waited on before its step.
    assert events == ["input ready", "step"] * 6
    assert engine._decode == jitted  # the engine's step is put back


def test_decode_step_times_reads_between_its_runs():
    # The bench reads the machine's bandwidth there: beside every run, never inside one.
    events: list[str] = []
    engine = _ToyEngine(events)
    requests = [Request(inputs=[1], max_new_tokens=4)]
    decode_step_times(engine, requests, repeats=2, between=lambda: events.append("read"))
    run = ["input ready", "step"] * 3
    assert events == ["read", *run, "read", *run, "read"]


def test_decode_step_times_keeps_each_dispatchs_fastest_and_the_fastest_run():
    # A burst slows one dispatch of each run, a different one each time: every dispatch has a
    # quiet run, while no run is quiet throughout.
    slow, quiet = 0.1, 0.02
    engine = _ToyEngine([], [[slow, quiet, quiet], [quiet, slow, quiet], [quiet, quiet, slow]])
    times = decode_step_times(engine, [Request(inputs=[1], max_new_tokens=12)], repeats=3)
    # 3 dispatches of 4 steps: 3 quiet dispatches over 12 steps against one run's slow + 2 quiet
    # (a sleep never ends early; on a busy machine it may end late, in every dispatch alike).
    assert times.dispatch_ms >= 3 * quiet / 12 * 1e3
    assert times.run_ms >= (slow + 2 * quiet) / 12 * 1e3
    assert times.dispatch_ms < 0.75 * times.run_ms


def test_static_batches_wait_for_arrivals():
    trace = _toy_trace([1, 1, 1], arrivals=[0.0, 0.05, 0.1])
    start = time.perf_counter()
    run = run_static_batches("toy", trace, 2, lambda inputs, n: [[0] * n for _ in inputs])
    assert time.perf_counter() - start >= 0.1
    assert run.wall_s >= 0.1
    assert all(lat >= 0 for lat in run.latency_s)
    assert run.latency_s[0] >= 0.05  # waited for its batch-mate


def test_compare_outputs_reports_the_first_mismatch():
    ok = compare_outputs([[1, 2], [3]], [[1, 2], [3]])
    assert ok["outputs_match_reference"] and ok["match_fraction"] == 1.0
    assert ok["tie_divergences"] == 0 and ok["first_mismatch"] is None
    bad = compare_outputs([[1, 2], [3, 4, 5], [9]], [[1, 2], [3, 7, 5], [8]])
    assert not bad["outputs_match_reference"] and bad["match_fraction"] == pytest.approx(1 / 3)
    assert bad["first_mismatch"]["request"] == 1 and bad["first_mismatch"]["position"] == 1
    short = compare_outputs([[1]], [[1, 2]])["first_mismatch"]
    assert short["position"] == 1 and short["got_len"] == 1


def test_divergences_at_numerical_ties_still_match():
    def tie_at_7(request, prefix, expected, got):
        return {"numerical_tie": got == 7}

    got, ref = [[1, 7, 9], [2, 3], [4, 8]], [[1, 6, 6], [2, 3], [4, 5]]
    tie_only = compare_outputs(got[:2], ref[:2], tie_at_7)
    assert tie_only["outputs_match_reference"] and tie_only["tie_divergences"] == 1
    assert tie_only["match_fraction"] == 0.5 and tie_only["first_mismatch"]["request"] == 0
    real = compare_outputs(got, ref, tie_at_7)
    assert not real["outputs_match_reference"] and real["first_mismatch"]["request"] == 2


def test_tie_check_recomputes_the_reference_logits(case):
    _, path, trace, reference = case
    check = TieCheck(encdec.load_pretrained(path, tokenizer=False), trace)
    i = max(range(len(trace)), key=lambda k: trace.requests[k].output_len)
    toks = reference[i]
    pos = len(toks) - 1
    logits = check.next_logits(i, toks[:pos])
    assert int(np.argmax(logits)) == toks[pos]  # teacher forcing agrees with greedy decoding
    wrong = int(np.argsort(logits)[len(logits) // 2])  # a median token: far from a tie
    verdict = check(i, toks[:pos], toks[pos], wrong)
    assert not verdict["numerical_tie"] and verdict["logit_gap"] > 0


def test_summarize_percentiles_and_throughput():
    trace = _toy_trace([2, 2, 2, 2])
    lat = [1.0, 2.0, 3.0, 4.0]
    run = SystemRun("toy", [[5, 5]] * 4, lat, wall_s=4.0, ttft_s=[0.5] * 4)
    row = summarize(run, trace, [[5, 5]] * 4)
    assert row["output_tokens"] == 8 and row["output_tokens_per_s"] == 2.0
    assert row["p50_latency_s"] == 2.5 and row["p99_latency_s"] == pytest.approx(np.percentile(lat, 99))
    assert row["ttft_p50_s"] == 0.5 and row["outputs_match_reference"] and row["lengths_exact"]


def test_dense_kv_memory_by_hand():
    cfg = ModelConfig.from_hf(dict(model_type="t5", vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2,
                                   num_heads=2))
    per_token = 2 * 2 * 4 * 4 * 2  # K+V x heads x head_dim x bytes x layers = 128
    mem = dense_kv_memory(cfg, 4, [[(3, 2), (1, 2)], [(5, 1)]])
    # batch 1: 2 rows x (3 cross + 2 self) = 10 token slots, 8 real; batch 2: 6 slots.
    assert mem["peak_kv_bytes"] == 10 * per_token
    assert mem["kv_utilization"] == pytest.approx(8 / 10)


def test_available_systems_names_every_system():
    reasons = available_systems()
    assert set(reasons) == set(SYSTEMS)
    assert reasons["hf-generate"] is None
