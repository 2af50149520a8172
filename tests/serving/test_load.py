"""The load test (``experiments/serve_load.yaml``) shrunk for CI: the same runner, a tiny model,
fewer requests and clients. Correctness only (lost, duplicated, wrong outputs, what the engine
holds afterwards); its throughput is a benchmark figure, not a test."""

import json

from encdec.bench.serve_load import ServeLoadConfig, run_serve_load

EXPERIMENT = "experiments/serve_load.yaml"


def test_the_experiment_file_loads():
    cfg = ServeLoadConfig.load(EXPERIMENT)
    assert (cfg.num_requests, cfg.concurrency, cfg.model.shape) == (1000, 64, "t5-small")
    assert cfg.cancel_fraction > 0 and cfg.disconnect_fraction > 0


def test_mixed_requests_with_cancellations_and_disconnects(text_model_dir, tmp_path):
    overrides = [
        "model.shape=tiny-t5",
        f"cache_dir={text_model_dir.parent}",
        "num_requests=100",
        "concurrency=16",
        "num_slots=8",
        "output_len={kind: uniform, low: 2, high: 16}",
        "cancel_fraction=0.15",
        "disconnect_fraction=0.1",
        "disconnect_within_s=0.05",  # the tiny model is quick: leave before it answers
        "time_limit_s=60",
        "offline_again=false",
    ]
    results = run_serve_load(ServeLoadConfig.load(EXPERIMENT, overrides), tmp_path, progress=False)
    checks = results["checks"]
    assert checks["passed"], json.dumps(checks, indent=1)
    assert (checks["lost"], checks["duplicated"], checks["wrong_outputs"]) == (0, 0, 0)
    after = ("tracked_requests_after", "self_pages_used_after", "cross_pages_used_after")
    assert [checks[k] for k in after] == [0, 0, 0]
    outcomes = checks["outcomes"]
    assert outcomes["completed"] >= 60 and outcomes["cancelled"] >= 3 and outcomes.get("disconnected", 0) >= 3
    assert sum(outcomes.values()) == 100
    # No request ended twice in the engine, none failed. (How many the engine cancelled depends
    # on timing: a client may hang up after its request finished; test_server pins that down.)
    finished = checks["engine_finished"]
    assert sum(finished.values()) <= 100 and finished.get("error", 0) == 0
    served = results["runs"][1]
    assert served["system"] == "encdec-serve" and served["ttft_p50_s"] > 0 and served["p99_latency_s"] > 0
    assert (tmp_path / "serve_load.png").stat().st_size > 0 and (tmp_path / "results.md").exists()
