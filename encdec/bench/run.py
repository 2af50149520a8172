"""Run an experiment: every model x workload x slot count x system, scored the same way.

Writes ``results.json`` (rewritten after every run, so a cut-off run keeps what it measured),
``results.csv``, ``throughput.png`` and ``latency_cdf.png`` to the output folder and prints a
markdown table. ``encdec run experiments/<name>.yaml`` is :func:`run_experiment_cli`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from pathlib import Path
from typing import Any

from encdec.bench.bandwidth import decode_weight_bytes, floor_ms, measure_bandwidth
from encdec.bench.config import ExperimentConfig, load_experiment, plain
from encdec.bench.machine import machine_info
from encdec.bench.metrics import SystemRun, TieCheck, reference_outputs, summarize, teacher_forced_agreement
from encdec.bench.models import resolve_model
from encdec.bench.results import write_results
from encdec.bench.systems import EncdecEngine, System, hf_beam_reference, make_system
from encdec.bench.workloads import Trace, make_trace
from encdec.checkpoints.pretrained import split_dtype
from encdec.engine import clear_compiled
from encdec.experiment_config import read_yaml

TABLE_COLUMNS = (
    ("model", "model"),
    ("workload", "workload"),
    ("num_slots", "slots"),
    ("system", "system"),
    ("output_tokens_per_s", "tok/s"),
    ("p50_latency_s", "p50 s"),
    ("p99_latency_s", "p99 s"),
    ("ttft_p50_s", "TTFT p50 s"),
    ("kv_utilization", "KV util"),
    ("outputs_match_reference", "match"),
    ("token_agreement", "agree"),
    ("teacher_forced_agreement", "TF agree"),
    ("decode_step_ms", "step ms"),
    ("run_step_ms", "run step ms"),
    ("bandwidth_GBps", "GB/s"),
    ("floor_ms", "floor ms"),
    ("kv_floor_ms", "+KV floor ms"),
)


def _median_run(runs: list) -> Any:
    by_wall = sorted(runs, key=lambda r: r.wall_s)
    return by_wall[(len(by_wall) - 1) // 2]


MAPS_SHARE_TO_CLEAR = 0.25
"""The share of ``vm.max_map_count`` above which the bench drops compiled steps before a workload:
one workload of three bench-sized engines took ~34,000 mappings (about half the default limit),
so a quarter leaves room for the next; tiny engines (the tests') stay well below and are reused."""


def memory_maps_share() -> float:
    """This process's memory mappings as a share of the kernel's limit (``vm.max_map_count``);
    0 where Linux's ``/proc`` does not say."""
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps", "rb") as f:
            count = sum(1 for _ in f)
    except (OSError, ValueError):
        return 0.0
    return count / max(limit, 1)


def _timed_runs(system: System, trace: Trace, slots: int, cfg: ExperimentConfig) -> list[SystemRun]:
    """Size the system to the trace, warm it up (untimed), then ``cfg.repeats`` timed runs."""
    system.prepare(trace, slots)
    warm = {"trace": trace, "short": trace.capped(4), "none": None}[cfg.warmup]
    if warm is not None:
        system.run(warm, slots)
    return [system.run(trace, slots) for _ in range(cfg.repeats)]


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run every combination of ``cfg``, write results to ``out_dir``, return the results dict."""
    from tqdm.auto import tqdm

    import encdec

    if "cuda" in (cfg.hf.device, cfg.ctranslate2.device):
        # JAX would otherwise take most of the GPU before PyTorch / CTranslate2 get any of it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [m.label for m in cfg.models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"models: the same model, dtype and seed are listed twice: {labels}")
    results: dict[str, Any] = {
        "experiment": cfg.name,
        "description": cfg.description,
        "config": cfg.to_dict(),
        "machine": {**machine_info(), "bandwidth": measure_bandwidth(cfg.bandwidth_probe_mib << 20)},
        "model": {},
        "workload": {},
        "runs": [],
    }
    total = len(cfg.models) * len(cfg.workloads) * len(cfg.num_slots) * len(cfg.systems)
    bar = tqdm(total=total, desc=cfg.name, disable=not progress, file=sys.stderr)
    for spec, label in zip(cfg.models, labels, strict=True):
        bar.set_postfix_str(f"preparing {label}")
        bench_model = resolve_model(spec, cfg.cache_dir)
        model_dir = bench_model.hf_dir
        # dtype int8: the float32 model gives the reference, its int8 copy runs the engine.
        model = encdec.load_pretrained(model_dir, dtype=split_dtype(spec.dtype)[0], tokenizer=False)
        engine_model = encdec.quantize_model(model) if spec.dtype == "int8" else model
        results["model"][label] = bench_model.info
        max_in = None if model.config.position == "relative" else model.config.max_positions
        systems: dict[str, System] = {}
        try:
            for wl in cfg.workloads:
                # A workload sizes its engines anew (their page pools are large). Their compiled
                # steps are dropped only where they hold many memory mappings (six float32 and
                # int8 engines of one model crossed vm.max_map_count); else the next reuses them.
                for system in systems.values():
                    if isinstance(system, EncdecEngine):
                        system.close()
                if memory_maps_share() > MAPS_SHARE_TO_CLEAR:
                    clear_compiled()
                trace = make_trace(wl, bench_model.token_range, max_input_len=max_in)
                results["workload"][wl.name] = {**trace.summary(), "config": plain(dataclasses.asdict(wl))}
                reference, tie_check = None, None
                if cfg.check_outputs and trace.num_beams == 1:
                    bar.set_postfix_str(f"reference {label} {wl.name}")
                    reference = reference_outputs(model, trace, chunk=cfg.reference_batch, progress=progress)
                    tie_check = TieCheck(model, trace)
                elif cfg.check_outputs:
                    bar.set_postfix_str(f"HF beam reference {label} {wl.name}")
                    ref_dtype = split_dtype(spec.dtype)[0]
                    reference = hf_beam_reference(model_dir, ref_dtype, trace, progress=progress)
                for slots, name in itertools.product(cfg.num_slots, cfg.systems):
                    bar.set_postfix_str(f"{label} {wl.name} slots={slots} {name}")
                    if name not in systems:
                        systems[name] = make_system(name, spec, cfg, model_dir=model_dir, model=engine_model)
                    runs = _timed_runs(systems[name], trace, slots, cfg)
                    # Static baselines cut a beam batch's hypotheses at each request's length:
                    # not what beam search at that length gives, so there is nothing to compare.
                    comparable = trace.num_beams == 1 or name.startswith("encdec")
                    ref = reference if comparable else None
                    row = summarize(_median_run(runs), trace, ref, tie_check, cfg.tie_checks)
                    is_engine = isinstance(systems[name], EncdecEngine)
                    system_model = systems[name].model if is_engine else None
                    if row.get("decode_step_ms") is not None and system_model is not None:
                        wb = decode_weight_bytes(system_model.params, system_model.config)
                        row["weight_bytes_per_step"] = wb
                        # The probe read beside this step (a busy neighbour moves both), else the run's.
                        run_bandwidth = results["machine"]["bandwidth"]["jax_read_GBps"]
                        bandwidth = row.get("bandwidth_GBps") or run_bandwidth
                        row["floor_ms"] = floor_ms(wb, bandwidth)
                        row["step_over_floor"] = row["decode_step_ms"] / row["floor_ms"]
                        if row.get("run_step_ms") is not None:
                            row["run_step_over_floor"] = row["run_step_ms"] / row["floor_ms"]
                        if row.get("kv_bytes_per_step") is not None:
                            row["kv_floor_ms"] = floor_ms(wb + row["kv_bytes_per_step"], bandwidth)
                    if ref is not None and system_model is not None and system_model.quantize is not None:
                        inputs = [list(r.input_ids) for r in trace.requests]
                        row["teacher_forced_agreement"] = teacher_forced_agreement(system_model, inputs, ref)
                    where = {"model": label, "dtype": spec.dtype, "workload": wl.name, "num_slots": slots}
                    results["runs"].append({**where, **row, "repeat_wall_s": [r.wall_s for r in runs]})
                    write_results(results, out_dir)
                    bar.update()
        finally:
            for system in systems.values():
                system.close()
            clear_compiled()  # the next model's engines compile afresh: see clear_compiled
    bar.close()
    from encdec.bench.plots import plot_results

    write_results(results, out_dir, markdown=markdown_table(results["runs"]), plots=plot_results)
    return results


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def markdown_table(runs: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for r in runs:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in TABLE_COLUMNS) + " |")
    for r in runs:
        m = r.get("first_mismatch")
        if m is None:
            continue
        kind = "numerical tie" if m.get("numerical_tie") else "MISMATCH"
        lines.append(
            f"\n{r['system']} on {r['model']}/{r['workload']}: "
            f"{r['match_fraction']:.1%} of requests match exactly, "
            f"{r['tie_divergences']} diverge at a numerical tie; first {kind}: request {m['request']} "
            f"token {m['position']}: expected {m['expected']}, got {m['got']}"
            + (f" (logit gap {m['logit_gap_rel']:.1e} of the logits' std)" if "logit_gap_rel" in m else "")
        )
    return "\n".join(lines)


def run_experiment_cli(experiment_path: str, overrides: list[str], out: str | None) -> int:
    """``encdec run EXPERIMENT.yaml [--set key=value ...] [--out DIR]``: text experiments here,
    ``kind: whisper`` files through :mod:`encdec.bench.whisper`, ``kind: whisper_longform``
    through :mod:`encdec.bench.whisper_longform`, ``kind: serve_load`` through
    :mod:`encdec.bench.serve_load`; prints the results table."""
    kind = read_yaml(experiment_path).get("kind")
    if kind == "whisper_longform":
        from encdec.bench.whisper_longform import (
            LongFormExperimentConfig,
            longform_table,
            run_longform_experiment,
        )

        lcfg = LongFormExperimentConfig.load(experiment_path, overrides)
        out_dir = Path(out) if out else Path("results") / lcfg.name
        table = longform_table(run_longform_experiment(lcfg, out_dir))
    elif kind == "serve_load":
        from encdec.bench.serve_load import ServeLoadConfig, run_serve_load, serve_load_table

        scfg = ServeLoadConfig.load(experiment_path, overrides)
        out_dir = Path(out) if out else Path("results") / scfg.name
        table = serve_load_table(run_serve_load(scfg, out_dir))
    elif kind == "whisper":
        from encdec.bench.whisper import WhisperExperimentConfig, run_whisper_experiment, whisper_table

        wcfg = WhisperExperimentConfig.load(experiment_path, overrides)
        out_dir = Path(out) if out else Path("results") / wcfg.name
        table = whisper_table(run_whisper_experiment(wcfg, out_dir))
    else:
        cfg = load_experiment(experiment_path, overrides)
        out_dir = Path(out) if out else Path("results") / cfg.name
        results = run_experiment(cfg, out_dir)
        m = results["machine"]
        print(
            f"machine: {m['cpu']}, {m['usable_cores']} cores, int8 products: {m['int8_products']}, "
            f"read bandwidth {m['bandwidth']['jax_read_GBps']:.1f} GB/s"
        )
        table = markdown_table(results["runs"])
    print(table)
    print(f"\nresults: {out_dir / 'results.json'}")
    return 0
