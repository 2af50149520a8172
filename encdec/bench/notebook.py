"""Analysis and plots behind ``notebooks/throughput.ipynb``; the notebook only calls these.

- :func:`benchmark_config`, :func:`run_benchmark`, :func:`load_results`: run a benchmark, or load
  its ``results.json``;
- :func:`plot_tokens_per_s`, :func:`plot_latency_cdf`: per system, from a results dict;
- :func:`sweep_output_spread`, :func:`spread_table`, :func:`plot_spread`: in-flight over static
  batching as the output lengths of a workload spread around the same mean;
- :func:`slot_occupancy`, :func:`plot_slot_occupancy`: busy decode slots over one run of each
  engine mode.

Plot functions draw on a given matplotlib ``Axes`` and leave figures and files to the caller.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.bench.config import (
    EngineSection,
    ExperimentConfig,
    ModelSpec,
    WorkloadConfig,
    load_experiment_dict,
)
from encdec.bench.plots import (  # noqa: F401 (the notebook's plots live in encdec.bench.plots)
    latency_cdf,
    plot_latency_cdf,
    plot_slot_occupancy,
    plot_spread,
    plot_tokens_per_s,
    run_group,
    system_color,
)
from encdec.bench.workloads import Trace


def load_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` written by :func:`encdec.bench.run.run_experiment`."""
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, dict) or "runs" not in results:
        raise ValueError(f"{path} is not a benchmark results.json (no 'runs')")
    return results


def benchmark_config(
    shape: str,
    *,
    num_requests: int,
    num_slots: int,
    systems: Sequence[str] = ("encdec-inflight", "encdec-static", "hf-generate"),
    input_len: tuple[int, int] = (16, 128),
    output_len: tuple[int, int] = (4, 128),
    engine_options: dict[str, Any] | None = None,
    check_outputs: bool = True,
    cache_dir: str | Path | None = None,
) -> ExperimentConfig:
    """The quickstart experiment on ``shape``: all requests at once, inputs uniform and outputs
    log-uniform over the given ``(low, high)``; the engine is sized to those maxima."""
    return load_experiment_dict({
        "name": f"throughput-{shape}",
        "models": [{"shape": shape}],
        "workloads": [{
            "name": "mixed", "num_requests": num_requests,
            "input_len": {"kind": "uniform", "low": input_len[0], "high": input_len[1]},
            "output_len": {"kind": "loguniform", "low": output_len[0], "high": output_len[1]},
        }],
        "systems": list(systems),
        "num_slots": [num_slots],
        "engine": {"max_encoder_len": input_len[1], "max_new_tokens": output_len[1],
                   "options": dict(engine_options or {})},
        "warmup": "short",
        "check_outputs": check_outputs,
        "cache_dir": None if cache_dir is None else str(cache_dir),
    })


def run_benchmark(cfg: ExperimentConfig, out_dir: str | Path) -> dict[str, Any]:
    """:func:`~encdec.bench.run.run_experiment` without progress bars."""
    from encdec.bench.run import run_experiment

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
        return run_experiment(cfg, out_dir, progress=False)


# --- in-flight vs static as output lengths spread ------------------------------------------------


def spread_workloads(
    mean_output_len: int,
    spreads: Sequence[float],
    *,
    num_requests: int,
    input_len: tuple[int, int],
    seed: int = 0,
) -> tuple[WorkloadConfig, ...]:
    """One workload per spread ``s``: outputs uniform over ``mean x [1 - s, 1 + s]`` (fixed at
    ``s = 0``), so the total work stays about the same; the same seed gives the same inputs."""
    from encdec.bench.config import LengthDist

    out = []
    for s in spreads:
        if not 0 <= s <= 1:
            raise ValueError(f"spreads must be in [0, 1], got {s}")
        low, high = max(1, round(mean_output_len * (1 - s))), round(mean_output_len * (1 + s))
        if low == high:
            out_len = LengthDist("fixed", value=mean_output_len)
        else:
            out_len = LengthDist("uniform", low=low, high=high)
        out.append(WorkloadConfig(
            name=f"spread-{s:g}", num_requests=num_requests, seed=seed, output_len=out_len,
            input_len=LengthDist("uniform", low=input_len[0], high=input_len[1]),
        ))
    return tuple(out)


def spread_table(
    results: dict[str, Any], system: str = "encdec-inflight", baseline: str = "encdec-static"
) -> list[dict[str, Any]]:
    """One row per model x slot count x workload: its output-length range over mean, each
    system's tokens/s and ``ratio`` = ``system`` tokens/s over ``baseline`` tokens/s."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results["runs"]:
        key = (r["model"], r["num_slots"], r["workload"])
        if key not in rows:
            lens = results["workload"][r["workload"]]["output_len"]
            rows[key] = {
                "model": r["model"], "num_slots": r["num_slots"], "workload": r["workload"],
                "output_len_min": lens["min"], "output_len_max": lens["max"],
                "relative_range": (lens["max"] - lens["min"]) / lens["mean"],
            }
        rows[key][f"{r['system']} tok/s"] = r["output_tokens_per_s"]
    for row in rows.values():
        num, den = row.get(f"{system} tok/s"), row.get(f"{baseline} tok/s")
        row["ratio"] = num / den if num and den else None
    return list(rows.values())


def sweep_output_spread(
    shape: str,
    spreads: Sequence[float],
    *,
    mean_output_len: int,
    num_requests: int,
    num_slots: int,
    input_len: tuple[int, int],
    out_dir: str | Path,
    systems: Sequence[str] = ("encdec-inflight", "encdec-static"),
    engine_options: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run ``systems`` on :func:`spread_workloads` (results in ``out_dir``); the :func:`spread_table`.

    Outputs are not checked against the reference here (the main benchmark does that), and every
    workload fits one engine size, so each engine compiles once.
    """
    workloads = spread_workloads(mean_output_len, spreads, num_requests=num_requests, input_len=input_len)
    max_new = max(w.output_len.max for w in workloads)
    cfg = load_experiment_dict({
        "name": f"spread-{shape}",
        "models": [{"shape": shape}],
        "workloads": [dataclasses.asdict(w) for w in workloads],
        "systems": list(systems),
        "num_slots": [num_slots],
        "engine": {"max_encoder_len": input_len[1], "max_new_tokens": max_new,
                   "options": dict(engine_options or {})},
        "warmup": "short",
        "check_outputs": False,
        "cache_dir": None if cache_dir is None else str(cache_dir),
    })
    return spread_table(run_benchmark(cfg, out_dir), *systems[:2])


# --- slot occupancy over time --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Busy decode slots during one engine run."""

    mode: str
    """``inflight`` or ``static``."""
    num_slots: int
    t_s: np.ndarray
    """Seconds since the run started, one per decode dispatch, then the end of the run."""
    busy: np.ndarray
    """Busy slots from each time until the next (0 at the end)."""
    wall_s: float

    @property
    def mean_fraction(self) -> float:
        """Time-weighted mean of busy slots over ``num_slots``, from the first dispatch to the end."""
        return mean_busy(self.t_s, self.busy) / self.num_slots


def occupancy_series(
    samples: Sequence[tuple[float, int]], t0: float, end: float
) -> tuple[np.ndarray, np.ndarray]:
    """Engine ``(perf_counter, busy)`` samples as times since ``t0``, closed by ``(end - t0, 0)``."""
    t = np.array([s[0] for s in samples] + [end], np.float64) - t0
    busy = np.array([s[1] for s in samples] + [0], np.int64)
    return t, busy


def mean_busy(t_s: np.ndarray, busy: np.ndarray) -> float:
    """Time-weighted mean of a step function that holds ``busy[k]`` from ``t_s[k]`` to ``t_s[k + 1]``."""
    span = float(t_s[-1] - t_s[0]) if len(t_s) > 1 else 0.0
    if span <= 0:
        return float(busy[0]) if len(busy) else 0.0
    return float((busy[:-1] * np.diff(t_s)).sum() / span)


def slot_occupancy(
    model: ModelSpec | str,
    workload: WorkloadConfig | Trace,
    num_slots: int,
    *,
    modes: Sequence[str] = ("inflight", "static"),
    engine: EngineSection | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Occupancy]:
    """Serve ``workload`` once per engine mode (after a warm-up compile) and record busy slots.

    ``engine`` sizes the engine as the benchmark does (0 = the trace's longest input / output).
    """
    import encdec
    from encdec.bench.models import resolve_model
    from encdec.bench.workloads import make_trace
    from encdec.engine import Engine, EngineConfig, Request

    engine = engine or EngineSection()
    spec = ModelSpec(model) if isinstance(model, str) else model
    bench_model = resolve_model(spec, cache_dir)
    loaded = encdec.load_pretrained(bench_model.hf_dir, dtype=spec.dtype, tokenizer=False)
    trace = workload
    if isinstance(workload, WorkloadConfig):
        c = loaded.config
        max_in = None if c.position == "relative" else c.max_positions
        trace = make_trace(workload, bench_model.token_range, max_input_len=max_in)
    requests = [
        Request(inputs=list(r.input_ids), max_new_tokens=r.output_len, min_new_tokens=r.output_len,
                arrival_time=r.arrival_s)
        for r in trace.requests
    ]
    out = {}
    for mode in modes:
        cfg = EngineConfig(
            num_slots=num_slots, page_size=engine.page_size,
            max_encoder_len=engine.max_encoder_len or trace.max_input_len,
            max_new_tokens=engine.max_new_tokens or trace.max_output_len, mode=mode, **engine.options,
        )
        eng = Engine(loaded, cfg)
        eng.warmup(max_input_len=cfg.max_encoder_len)
        eng.reset_stats()
        t0 = time.perf_counter()
        outputs = eng.generate(requests)
        end = max(o.timings["done"] for o in outputs)
        t, busy = occupancy_series(eng.stats().slot_occupancy, t0, end)
        out[mode] = Occupancy(mode, num_slots, t, busy, end - t0)
    return out


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a markdown table (floats: whole numbers from 100 up, else three digits)."""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
