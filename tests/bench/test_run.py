"""One-step smoke runs of every experiment file, shrunk to tiny shapes, with the systems that exist."""

import csv
import json
import os
from pathlib import Path

import jax
import pytest
import yaml

from encdec.bench import run as bench_run
from encdec.bench import systems as bench_systems
from encdec.bench.bandwidth import floor_ms, measure_bandwidth
from encdec.bench.config import load_experiment
from encdec.bench.run import markdown_table, memory_maps_share, run_experiment
from encdec.bench.shapes import get_shape
from encdec.bench.systems import available_systems
from encdec.cli import main
from pallas_kernels.cpu_build import cpu_flags

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
RUN_KEYS = {
    "system", "model", "workload", "num_slots", "output_tokens_per_s", "p50_latency_s", "p99_latency_s",
    "ttft_p50_s", "outputs_match_reference", "match_fraction", "first_mismatch", "wall_s", "output_tokens",
    "latencies_s", "peak_kv_bytes", "kv_utilization",
}


def shrink(path: Path, cache: Path) -> list[str]:
    """Overrides that make an experiment tiny: tiny shapes of the same family, three requests of a
    few tokens, two slots, no warm-up, CPU, and only the systems this environment has. Workloads
    that differ only in their lengths are alike once shrunk: the first of each kind (beams,
    arrivals) runs."""
    raw = yaml.safe_load(path.read_text())
    kinds: dict[tuple, dict] = {}
    for w in raw["workloads"]:
        kinds.setdefault((w.get("num_beams", 1), w.get("arrival", "all-at-once")), w)
    out = [f"workloads={json.dumps(list(kinds.values()))}"]
    out += [f"models.{i}.shape=tiny-{get_shape(m['shape']).family}" for i, m in enumerate(raw["models"])]
    out += [f"models.{i}.seed={i}" for i in range(len(raw["models"]))]  # keep labels distinct
    ok = available_systems()
    systems = [s for s in raw.get("systems", load_experiment(path).systems) if ok[s] is None]
    out += [
        f"systems=[{', '.join(systems)}]", "num_slots=[2]", "warmup=none", "workloads.num_requests=3",
        "workloads.input_len={kind: uniform, low: 2, high: 9}",
        "workloads.output_len={kind: uniform, low: 1, high: 5}",
        "hf.device=cpu", "ctranslate2.device=cpu", f"cache_dir={cache}",
        "engine.options.max_encoder_batch=2",  # few encoder variants to compile
        # one engine size for every workload (each trace would size its own): compiled once
        "engine.max_encoder_len=16", "engine.max_new_tokens=8",
        "bandwidth_probe_mib=8",  # the probe's path, not a figure: ~0.3 s a probe at 256 MiB
    ]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.mark.parametrize("name", ["quickstart", "bench_cpu", "bench_gpu", "bench_cpu_int8", "bench_gpu_int8"])
def test_experiment_smoke_run_writes_results(name, cache, tmp_path, monkeypatch):
    path = EXPERIMENTS / f"{name}.yaml"
    cfg = load_experiment(path, shrink(path, cache))
    probed = []

    def probe(nbytes, *args, **kwargs):
        probed.append(nbytes)
        return measure_bandwidth(nbytes, *args, **kwargs)

    for module in (bench_run, bench_systems):
        monkeypatch.setattr(module, "measure_bandwidth", probe)
    results = run_experiment(cfg, tmp_path, progress=False)
    assert set(probed) == {cfg.bandwidth_probe_mib << 20}  # the machine's probe and every step's

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"experiment", "config", "machine", "model", "workload", "runs"} <= set(saved)
    assert {"cpu", "cores", "device_kind", "jax_backend"} <= set(saved["machine"])
    # What int8 products multiply with moves an int8 step's distance from its floor: recorded.
    flags, amx_off = cpu_flags(), os.environ.get("ENCDEC_INT8_AMX") == "0"
    if jax.default_backend() != "cpu":
        isa = "XLA"
    elif {"amx_tile", "amx_int8"} <= flags and not amx_off:
        isa = "AMX"
    else:
        isa = "VPDPBUSD" if "avx512_vnni" in flags else "XLA"
    assert saved["machine"]["int8_products"] == isa
    expected = len(cfg.models) * len(cfg.workloads) * len(cfg.num_slots) * len(cfg.systems)
    assert len(saved["runs"]) == expected
    for run in saved["runs"]:
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        assert run["model"] in saved["model"] and run["workload"] in saved["workload"]
        assert run["output_tokens"] == saved["workload"][run["workload"]]["output_tokens"]
        assert run["output_tokens_per_s"] > 0 and run["p50_latency_s"] <= run["p99_latency_s"]
        assert len(run["latencies_s"]) == 3
        beams = saved["workload"][run["workload"]]["num_beams"] > 1
        static_baseline = not run["system"].startswith("encdec")
        if beams and static_baseline:  # a static beam batch is cut per request: not comparable
            assert run["outputs_match_reference"] is None
        elif cfg.models[0].dtype == "float32" and "int8" not in run["system"]:
            assert run["outputs_match_reference"] is True, run["first_mismatch"]
        if run["system"].startswith("encdec"):
            assert run["ttft_p50_s"] is not None and 0 < run["kv_utilization"] <= 1
        if run.get("decode_step_ms") is not None:  # the cache adds to the weights' floor
            assert 0 < run["floor_ms"] < run["kv_floor_ms"]
            # each dispatch's fastest is no slower than the fastest whole run
            assert 0 < run["decode_step_ms"] <= run["run_step_ms"]
            # the floor is at the bandwidth probed beside this row's step
            expected_floor = floor_ms(run["weight_bytes_per_step"], run["bandwidth_GBps"])
            assert run["floor_ms"] == pytest.approx(expected_floor)
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == expected
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
    table = markdown_table(saved["runs"]).splitlines()
    assert sum(line.startswith("| ") for line in table) == expected + 1  # int8 rows add mismatch notes


def test_compiled_steps_are_dropped_only_past_a_share_of_the_map_limit(cache, tmp_path, monkeypatch):
    assert 0 < memory_maps_share() < bench_run.MAPS_SHARE_TO_CLEAR  # this process: few mappings
    cleared = []
    monkeypatch.setattr(bench_run, "clear_compiled", lambda: cleared.append(True))
    path = EXPERIMENTS / "quickstart.yaml"
    overrides = shrink(path, cache) + ["systems=[encdec-inflight]", "check_outputs=false"]
    run_experiment(load_experiment(path, overrides), tmp_path / "below", progress=False)
    assert cleared == [True]  # after the model only: its workload's engines could be reused
    monkeypatch.setattr(bench_run, "MAPS_SHARE_TO_CLEAR", 0.0)
    cleared.clear()
    run_experiment(load_experiment(path, overrides), tmp_path / "above", progress=False)
    assert cleared == [True, True]  # before the workload as well


def test_cli_runs_an_experiment_and_prints_a_table(cache, tmp_path, capsys):
    path = EXPERIMENTS / "quickstart.yaml"
    args = ["run", str(path), "--out", str(tmp_path)]
    for override in shrink(path, cache) + ["systems=[hf-generate]", "check_outputs=false"]:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| hf-generate |" in out and "results.json" in out
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["outputs_match_reference"] is None


def test_cli_reports_config_errors_by_key(tmp_path, capsys):
    assert main(["run", str(EXPERIMENTS / "quickstart.yaml"), "--set", "workloads.0.arival=poisson"]) == 2
    assert "workloads[0].arival" in capsys.readouterr().err
