"""One results writer for every experiment: ``results.json``, ``results.csv``, ``results.md``, plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

CSV_SKIP = ("latencies_s", "ttfts_s", "first_mismatch", "repeat_wall_s", "compiled")
"""Per-run fields too long for a CSV cell (they stay in results.json)."""


def write_results(
    results: dict[str, Any],
    out_dir: Path,
    *,
    markdown: str | None = None,
    plots: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """``results.json`` (always), ``results.csv`` of its ``runs``, ``results.md`` and the plots
    (``plots(results, out_dir)`` writes its PNGs). Called after every run, so a cut-off
    experiment keeps what it measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    if results.get("runs"):
        write_csv(results["runs"], out_dir / "results.csv")
    if markdown is not None:
        (out_dir / "results.md").write_text(markdown + "\n")
    if plots is not None:
        plots(results, out_dir)


def write_csv(runs: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for row in runs:
        keys += [k for k in row if k not in keys and k not in CSV_SKIP]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in runs:
            writer.writerow({k: row.get(k) for k in keys})
