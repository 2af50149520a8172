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

import contextlib
import dataclasses
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.bench.config import (
    SYSTEMS,
    EngineSection,
    ExperimentConfig,
    ModelSpec,
    WorkloadConfig,
    load_experiment_dict,
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


@contextlib.contextmanager
def keep_matplotlib_backend():
    """Restore matplotlib's backend on exit: ``run_experiment`` switches to Agg to write its PNGs,
    which would stop a notebook from showing figures inline."""
    import matplotlib

    backend = matplotlib.get_backend()
    try:
        yield
    finally:
        if matplotlib.get_backend() != backend:
            import matplotlib.pyplot as plt

            plt.switch_backend(backend)


def run_benchmark(cfg: ExperimentConfig, out_dir: str | Path) -> dict[str, Any]:
    """:func:`~encdec.bench.run.run_experiment` without progress bars, keeping the plot backend."""
    from encdec.bench.run import run_experiment

    with keep_matplotlib_backend(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
        return run_experiment(cfg, out_dir, progress=False)


# --- per-system plots ----------------------------------------------------------------------------


def system_color(system: str) -> Any:
    """The same color for a system in every plot."""
    import matplotlib

    i = SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS)
    return matplotlib.colormaps["tab10"](i % 10)


def run_group(run: dict[str, Any]) -> str:
    """What a run is compared within: model, workload and slot count."""
    return f"{run['model']} / {run['workload']} / {run['num_slots']} slots"


def plot_tokens_per_s(results: dict[str, Any], ax) -> None:
    """Output tokens per second, one bar per system, grouped by model x workload x slot count."""
    runs = results["runs"]
    groups = list(dict.fromkeys(run_group(r) for r in runs))
    systems = list(dict.fromkeys(r["system"] for r in runs))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        xs, ys = [], []
        for i, g in enumerate(groups):
            row = next((r for r in runs if r["system"] == system and run_group(r) == g), None)
            if row is not None and row["output_tokens_per_s"] is not None:
                xs.append(i + (j - (len(systems) - 1) / 2) * width)
                ys.append(row["output_tokens_per_s"])
        bars = ax.bar(xs, ys, width, label=system, color=system_color(system))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("output tokens / s")
    device = results.get("machine", {}).get("device_kind", "?")
    ax.set_title(f"{results.get('experiment', '')}: throughput on {device}")
    ax.legend(fontsize=8)


def latency_cdf(latencies_s: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted latencies and the fraction of requests done by each: ``(k + 1) / n``."""
    x = np.sort(np.asarray(latencies_s, np.float64))
    return x, np.arange(1, len(x) + 1) / len(x)


def plot_latency_cdf(results: dict[str, Any], ax) -> None:
    """Per system, the fraction of requests finished within each latency (a step per request)."""
    runs = [r for r in results["runs"] if r.get("latencies_s")]
    several = len({run_group(r) for r in runs}) > 1
    for r in runs:
        x, y = latency_cdf(r["latencies_s"])
        label = f"{r['system']} (p50 {r['p50_latency_s']:.3g} s, p99 {r['p99_latency_s']:.3g} s)"
        ax.step(np.r_[x[0], x], np.r_[0.0, y], where="post", color=system_color(r["system"]),
                label=f"{label}\n{run_group(r)}" if several else label)
    lat = [x for r in runs for x in r["latencies_s"]]
    log = bool(lat) and min(lat) > 0 and max(lat) / min(lat) > 30  # systems far apart: log scale
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("latency: arrival to last token (s" + (", log scale)" if log else ")"))
    ax.set_ylabel("fraction of requests done")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


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


def plot_spread(rows: Sequence[dict[str, Any]], ax) -> None:
    """The in-flight / static throughput ratio against the spread of output lengths."""
    groups = list(dict.fromkeys((r["model"], r["num_slots"]) for r in rows))
    for model, slots in groups:
        pts = sorted((r["relative_range"], r["ratio"]) for r in rows
                     if (r["model"], r["num_slots"]) == (model, slots) and r["ratio"] is not None)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{model}, {slots} slots")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("spread of output lengths: (max - min) / mean")
    ax.set_ylabel("in-flight tok/s / static tok/s")
    ax.set_title("in-flight over static batching")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


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
        t, busy = occupancy_series(eng.stats()["slot_occupancy"], t0, end)
        out[mode] = Occupancy(mode, num_slots, t, busy, end - t0)
    return out


def plot_slot_occupancy(occupancy: dict[str, Occupancy], ax) -> None:
    """Busy slots against time, one step line per engine mode."""
    from matplotlib.ticker import MaxNLocator

    for mode, occ in occupancy.items():
        ax.step(occ.t_s, occ.busy, where="post", color=system_color(f"encdec-{mode}"), linewidth=1.5,
                label=f"{mode}: {occ.mean_fraction:.0%} busy, done in {occ.wall_s:.3g} s")
    slots = max(o.num_slots for o in occupancy.values())
    ax.set_ylim(0, slots * 1.3 + 0.5)  # headroom for the legend
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("busy decode slots")
    ax.set_title(f"slot occupancy, {slots} slots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(occupancy))


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
