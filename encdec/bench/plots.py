"""Plots of benchmark results, shared by ``encdec run`` (PNG files) and the notebooks.

Every function draws on a given matplotlib ``Axes`` (or writes ``Figure`` objects, never
pyplot), so a notebook's inline backend is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.bench.config import SYSTEMS

SERVE_SYSTEMS = ("encdec-offline", "encdec-serve")
"""The serving load test's two runs (``encdec.bench.serve_load``)."""


def system_color(system: str) -> Any:
    """The same color for a system in every plot."""
    import matplotlib

    names = SYSTEMS + SERVE_SYSTEMS
    i = names.index(system) if system in names else len(names)
    return matplotlib.colormaps["tab10"](i % 10)


def run_group(run: dict[str, Any]) -> str:
    """What a run is compared within: model, workload and slot count."""
    return f"{run['model']} / {run['workload']} / {run['num_slots']} slots"


def plot_tokens_per_s(results: dict[str, Any], ax) -> None:
    """Output tokens per second, one bar per system, grouped by model x workload x slot count."""
    runs = results["runs"]
    if not runs:
        return
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


def plot_slot_occupancy(occupancy: dict[str, Any], ax) -> None:
    """Busy slots against time, one step line per engine mode (``encdec.bench.notebook.Occupancy``
    by mode)."""
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


def plot_results(results: dict[str, Any], out_dir: Path) -> None:
    """``throughput.png`` (output tokens/s per system) and ``latency_cdf.png`` (one panel per
    model x workload x slot count), drawn by the notebook's plot functions."""
    # Figure objects, not pyplot: a notebook's inline backend is left alone.
    from matplotlib.figure import Figure

    runs = results["runs"]
    groups = list(dict.fromkeys(run_group(r) for r in runs))
    systems = {r["system"] for r in runs}
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(systems)) / 2), 4.5))
    plot_tokens_per_s(results, fig.subplots())
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=120)

    cols = min(3, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, g in zip(axes.flat, groups, strict=False):
        plot_latency_cdf({**results, "runs": [r for r in runs if run_group(r) == g]}, ax)
        ax.set_title(g, fontsize=9)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=120)


def plot_ttft_cdf(results: dict[str, Any], ax) -> None:
    """Per run, the fraction of requests whose first token had arrived by each time."""
    for r in (r for r in results["runs"] if r.get("ttfts_s")):
        x, y = latency_cdf(r["ttfts_s"])
        label = f"{r['system']} (p50 {r['ttft_p50_s']:.3g} s, p99 {r['ttft_p99_s']:.3g} s)"
        ax.step(np.r_[x[0], x], np.r_[0.0, y], where="post", color=system_color(r["system"]), label=label)
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def plot_serve_load(results: dict[str, Any], out_dir: Path) -> None:
    """``serve_load.png``: throughput offline vs served, and the latency and TTFT CDFs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5))
    ax_tput, ax_lat, ax_ttft = fig.subplots(1, 3)
    plot_tokens_per_s(results, ax_tput)
    plot_latency_cdf(results, ax_lat)
    ax_lat.set_title("latency (served: client-side, completed requests)", fontsize=9)
    plot_ttft_cdf(results, ax_ttft)
    ax_ttft.set_title("time to first token", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "serve_load.png", dpi=120)
