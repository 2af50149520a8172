"""The notebook's helpers: CDFs, spread workloads and tables, occupancy series computed by hand;
plots draw exactly what the results hold; one tiny engine run per mode."""

import json

import numpy as np
import pytest

from encdec.bench import notebook as nb
from encdec.bench.config import EngineSection, LengthDist
from encdec.bench.shapes import get_shape
from encdec.bench.workloads import Trace, TraceRequest, make_trace

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _run(system, workload, tok_s, latencies, slots=2):
    return {
        "model": "tiny-t5", "workload": workload, "num_slots": slots, "system": system,
        "output_tokens_per_s": tok_s, "latencies_s": latencies,
        "p50_latency_s": float(np.percentile(latencies, 50)),
        "p99_latency_s": float(np.percentile(latencies, 99)),
    }


@pytest.fixture
def results():
    """Two workloads x three systems, as run_experiment writes them."""
    return {
        "experiment": "toy",
        "machine": {"device_kind": "cpu"},
        "workload": {
            "spread-0": {"output_len": {"min": 8, "mean": 8.0, "max": 8}},
            "spread-1": {"output_len": {"min": 1, "mean": 8.0, "max": 16}},
        },
        "runs": [
            _run("encdec-inflight", "spread-0", 100.0, [1.0, 2.0]),
            _run("encdec-static", "spread-0", 100.0, [1.5, 1.5]),
            _run("hf-generate", "spread-0", 20.0, [4.0, 4.0]),
            _run("encdec-inflight", "spread-1", 150.0, [0.5, 2.0, 1.0]),
            _run("encdec-static", "spread-1", 50.0, [3.0, 3.0, 3.0]),
            _run("hf-generate", "spread-1", 10.0, [9.0, 9.0, 9.0]),
        ],
    }


def test_latency_cdf_by_hand():
    x, y = nb.latency_cdf([0.3, 0.1, 0.2, 0.2])
    np.testing.assert_allclose(x, [0.1, 0.2, 0.2, 0.3])
    np.testing.assert_allclose(y, [0.25, 0.5, 0.75, 1.0])


def test_load_results_round_trips_and_rejects_other_json(tmp_path, results):
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert nb.load_results(tmp_path / "results.json") == results
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'runs'"):
        nb.load_results(tmp_path / "other.json")


def test_benchmark_config_sizes_the_engine_to_its_workload():
    cfg = nb.benchmark_config("tiny-t5", num_requests=5, num_slots=3, input_len=(2, 12), output_len=(1, 20),
                              engine_options={"max_encoder_batch": 2}, systems=["encdec-inflight"])
    (wl,) = cfg.workloads
    assert wl.num_requests == 5 and wl.arrival == "all-at-once"
    assert wl.input_len == LengthDist("uniform", low=2, high=12)
    assert wl.output_len == LengthDist("loguniform", low=1, high=20)
    assert cfg.num_slots == (3,) and cfg.systems == ("encdec-inflight",)
    assert (cfg.engine.max_encoder_len, cfg.engine.max_new_tokens) == (12, 20)
    assert cfg.engine.options == {"max_encoder_batch": 2}


def test_spread_workloads_keep_the_mean_and_the_inputs():
    wls = nb.spread_workloads(8, [0, 0.5, 1], num_requests=400, input_len=(2, 6))
    assert [w.output_len for w in wls] == [
        LengthDist("fixed", value=8),
        LengthDist("uniform", low=4, high=12),
        LengthDist("uniform", low=1, high=16),
    ]
    traces = [make_trace(w, get_shape("tiny-t5").token_range) for w in wls]
    assert len({tuple(r.input_ids for r in t.requests) for t in traces}) == 1  # same inputs
    means = [np.mean([r.output_len for r in t.requests]) for t in traces]
    np.testing.assert_allclose(means, 8, atol=0.6)
    spans = [t.summary()["output_len"]["max"] - t.summary()["output_len"]["min"] for t in traces]
    assert spans[0] == 0 < spans[1] < spans[2]
    with pytest.raises(ValueError, match="spreads"):
        nb.spread_workloads(8, [1.5], num_requests=4, input_len=(2, 6))


def test_spread_table_by_hand(results):
    rows = nb.spread_table(results)
    assert [r["workload"] for r in rows] == ["spread-0", "spread-1"]
    assert [r["relative_range"] for r in rows] == [0.0, 15 / 8]
    assert [r["ratio"] for r in rows] == [1.0, 3.0]
    assert rows[1]["hf-generate tok/s"] == 10.0 and rows[1]["output_len_max"] == 16
    assert [r["ratio"] for r in nb.spread_table(results, "encdec-static", "hf-generate")] == [5.0, 5.0]
    assert nb.spread_table(results, "ctranslate2")[0]["ratio"] is None  # not run


def test_occupancy_series_and_mean_by_hand():
    t, busy = nb.occupancy_series([(10.0, 2), (10.5, 2), (11.0, 1)], t0=9.9, end=12.0)
    np.testing.assert_allclose(t, [0.1, 0.6, 1.1, 2.1])
    np.testing.assert_array_equal(busy, [2, 2, 1, 0])
    assert nb.mean_busy(t, busy) == pytest.approx((2 * 0.5 + 2 * 0.5 + 1 * 1.0) / 2.0)
    assert nb.Occupancy("static", 2, t, busy, 2.1).mean_fraction == pytest.approx(0.75)
    assert nb.mean_busy(np.array([1.0]), np.array([3])) == 3.0


def test_format_table():
    table = nb.format_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": None}, {"b": 12345.6}])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| 2 | - |", "| - | 12,346 |"]


def test_plots_draw_what_the_results_hold(results):
    fig, axes = plt.subplots(1, 4)
    nb.plot_tokens_per_s(results, axes[0])
    heights = sorted(p.get_height() for p in axes[0].patches)
    assert heights == sorted(r["output_tokens_per_s"] for r in results["runs"])
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["tiny-t5 / spread-0 / 2 slots",
                                                                 "tiny-t5 / spread-1 / 2 slots"]

    nb.plot_latency_cdf(results, axes[1])
    lines = axes[1].get_lines()
    assert len(lines) == len(results["runs"])
    x, y = lines[3].get_data()  # inflight on spread-1: from 0 up to every request done
    np.testing.assert_allclose(x, [0.5, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(y, [0, 1 / 3, 2 / 3, 1])

    nb.plot_spread(nb.spread_table(results), axes[2])
    x, y = axes[2].get_lines()[0].get_data()
    np.testing.assert_allclose(x, [0.0, 15 / 8])
    np.testing.assert_allclose(y, [1.0, 3.0])

    t, busy = np.array([0.0, 1.0, 2.0]), np.array([2, 1, 0])
    occ = {m: nb.Occupancy(m, 2, t, busy, 2.0) for m in ("inflight", "static")}
    nb.plot_slot_occupancy(occ, axes[3])
    assert [line.get_label().split(":")[0] for line in axes[3].get_lines()] == ["inflight", "static"]
    assert "75% busy" in axes[3].get_lines()[0].get_label()
    plt.close(fig)


def test_slot_occupancy_runs_each_engine_mode(tmp_path):
    """Long and one-token requests alternate: static runs every batch to its long member, so it
    needs more decode dispatches than in-flight, which refills a slot as soon as it frees."""
    low, _ = get_shape("tiny-t5").token_range
    lengths = [16, 1, 16, 1, 16, 1]
    requests = tuple(TraceRequest(i, (low + i, low + 1), n, 0.0) for i, n in enumerate(lengths))
    trace = Trace("alternating", requests)
    engine = EngineSection(options={"max_encoder_batch": 2, "steps_per_dispatch": 4})
    occ = nb.slot_occupancy("tiny-t5", trace, 2, engine=engine, cache_dir=tmp_path)
    assert set(occ) == {"inflight", "static"}
    for o in occ.values():
        assert np.all(np.diff(o.t_s) >= 0) and o.t_s[-1] == pytest.approx(o.wall_s)
        assert o.busy.max() <= 2 and o.busy[-1] == 0 and 0 < o.mean_fraction <= 1
        assert 4 * o.busy[:-1].sum() >= sum(lengths)  # every token is decoded in a busy slot
    assert len(occ["static"].t_s) > len(occ["inflight"].t_s)
