"""The serving load test (``kind: serve_load``): ``encdec serve`` on a loopback port against the
same engine driven offline, on one seeded trace of mixed requests.

1. The trace: prompts (text, from the model's ordinary tokens), exact output lengths
   (``min_tokens = max_tokens``, as every benchmark here), greedy or seeded sampling, streamed
   or not, and what each client does: read to the end, cancel mid-stream, or disconnect.
2. Offline: ``Engine.generate`` on every request at once (after ``warmup``). Its outputs are
   the reference every completed served request must equal, and its tokens/s the baseline
   (run before and after the served run; the faster of the two counts, as the machine may be
   shared).
3. Served: the same engine behind the HTTP app (:class:`~encdec.serving.ServerThread`), and
   ``concurrency`` clients in another process (:mod:`encdec.bench.serve_client`, the official
   ``openai`` client). Afterwards the engine must hold nothing: no tracked request, no page.

Checks: no request lost (every request whose client read to the end completed with the
reference text and one finish chunk), none duplicated (one finish and one usage chunk each,
no more requests ended in the engine than were sent), nothing left in the engine. Figures:
tokens/s of both, the served/offline ratio, client-side p50/p99 latency and time to first
token. Writes ``results.json``, ``results.md`` and ``serve_load.png``.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from encdec.bench.config import EngineSection, LengthDist, ModelSpec
from encdec.bench.machine import machine_info
from encdec.bench.models import resolve_model
from encdec.bench.results import write_results
from encdec.experiment_config import ConfigError, build, plain, read_yaml, require


@dataclasses.dataclass(frozen=True)
class ServeLoadConfig:
    """One load test: a model, a trace of mixed requests, the clients' behaviour, the engine."""

    name: str = "serve_load"
    """Names the default output folder ``results/<name>``."""
    description: str = ""
    model: ModelSpec = ModelSpec(shape="t5-small")
    """The served model (a named random-weight shape or a local checkpoint with a tokenizer)."""
    num_requests: int = 1000
    concurrency: int = 64
    """Clients sending at once (each sends its next request when the last one ends)."""
    input_len: LengthDist = LengthDist("uniform", low=8, high=64)
    """Prompt tokens."""
    output_len: LengthDist = LengthDist("uniform", low=4, high=48)
    """Exact output tokens of each request."""
    sampled_fraction: float = 0.5
    """Requests that sample (``temperature``, ``top_p`` 0.95, seed = their index); the rest greedy."""
    temperature: float = 0.8
    streamed_fraction: float = 0.8
    """Requests sent with ``stream: true``; the rest wait for the whole completion."""
    cancel_fraction: float = 0.1
    """Streamed requests whose client closes the stream after a random number of chunks."""
    disconnect_fraction: float = 0.05
    """Requests whose client drops the connection after a random 0 to ``disconnect_within_s``
    seconds, wherever they are (queued, running, or done if they were quick)."""
    disconnect_within_s: float = 2.0
    num_slots: int = 16
    engine: EngineSection = EngineSection()
    """Engine options (``max_encoder_len`` / ``max_new_tokens`` 0: the trace's longest)."""
    max_pending: int = 256
    """The server's bound on unfinished requests (above ``concurrency``: no 429 in this test)."""
    time_limit_s: float = 600.0
    """The clients stop sending after this long; the run then fails its checks."""
    offline_again: bool = True
    """Run ``Engine.generate`` again after the served run (on a shared machine the faster of
    the two offline runs is the baseline; both must return the same tokens)."""
    seed: int = 0
    cache_dir: str | None = None
    """Where shape checkpoints are cached (see ``ExperimentConfig.cache_dir``)."""

    def __post_init__(self):
        for key in ("num_requests", "concurrency", "num_slots", "max_pending"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("sampled_fraction", "streamed_fraction", "cancel_fraction", "disconnect_fraction"):
            require(0.0 <= getattr(self, key) <= 1.0, key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("time_limit_s", "disconnect_within_s"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ServeLoadConfig:
        raw = read_yaml(path)
        kind = raw.pop("kind", "serve_load")
        if kind != "serve_load":
            raise ConfigError("kind", f"{path} is not a serve_load experiment (kind: {kind!r})")
        return build(cls, raw, overrides)


def make_plan(
    cfg: ServeLoadConfig, tokenizer: Any, token_range: tuple[int, int], served_name: str
) -> list[dict]:
    """Every request of the trace and what its client does with it (seeded)."""
    from encdec.bench.workloads import sample_lengths

    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_requests
    in_lens = sample_lengths(cfg.input_len, n, rng)
    out_lens = sample_lengths(cfg.output_len, n, rng)
    plan = []
    for i in range(n):
        ids = rng.integers(*token_range, int(in_lens[i])).tolist()
        sampled = rng.random() < cfg.sampled_fraction
        stream = bool(rng.random() < cfg.streamed_fraction)
        draw = rng.random()
        action = "complete"
        if draw < cfg.disconnect_fraction:
            action = "disconnect"
        elif stream and draw < cfg.disconnect_fraction + cfg.cancel_fraction:
            action = "cancel"
        length = int(out_lens[i])
        args = {
            "model": served_name,
            "prompt": tokenizer.decode(ids, skip_special_tokens=True),
            "max_tokens": length,
            "temperature": cfg.temperature if sampled else 0.0,
            "top_p": 0.95 if sampled else 1.0,
            "seed": i,
            "extra_body": {"min_tokens": length},
        }
        plan.append(
            {
                "index": i,
                "args": args,
                "stream": stream,
                "action": action,
                "after_chunks": int(rng.integers(1, 4)),
                "after_s": float(rng.uniform(0.0, cfg.disconnect_within_s)),
            }
        )
    return plan


def engine_request(item: dict[str, Any]):
    """The engine request a planned HTTP request becomes (as the server builds it)."""
    from encdec.engine import Request

    a = item["args"]
    return Request(
        a["prompt"],
        max_new_tokens=a["max_tokens"],
        min_new_tokens=a["extra_body"]["min_tokens"],
        temperature=a["temperature"],
        top_p=a["top_p"],
        seed=a["seed"],
    )


def _pct(x: list[float], q: float) -> float | None:
    return float(np.percentile(x, q)) if x else None


def _row(
    system: str,
    cfg: ServeLoadConfig,
    label: str,
    tokens: int,
    wall: float,
    lat: list,
    ttft: list,
    engine: dict[str, Any],
) -> dict:
    return {
        **engine,
        "model": label,
        "workload": f"{cfg.num_requests} requests",
        "num_slots": cfg.num_slots,
        "system": system,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "p50_latency_s": _pct(lat, 50),
        "p99_latency_s": _pct(lat, 99),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "latencies_s": [float(x) for x in lat],
        "ttfts_s": [float(x) for x in ttft],
    }


def _engine_figures(stats: Any, cpu_s: float, wall_s: float) -> dict[str, Any]:
    """How busy the engine was in a phase, and the CPU this process (and its children) used."""
    return {
        "mean_busy_slots": stats.mean_busy_slots,
        "dispatches": stats.dispatches,
        "decode_steps": stats.decode_steps,
        "encode_batches": stats.encode_batches,
        "cpu_s": cpu_s,
        "cpu_per_wall": cpu_s / wall_s if wall_s > 0 else None,
    }


def _cpu() -> float:
    """CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _offline(engine: Any, requests: list) -> tuple[list, tuple]:
    """``Engine.generate`` on every request at once: outputs, and the arguments of :func:`_row`
    after the label (tokens, wall, latencies, TTFTs, engine figures)."""
    engine.reset_stats()
    start, cpu = time.perf_counter(), _cpu()
    outputs = engine.generate(requests)
    wall = time.perf_counter() - start
    lat = [o.timings["done"] - o.timings["arrival"] for o in outputs]
    ttft = [o.timings["first_token"] - o.timings["arrival"] for o in outputs]
    figures = _engine_figures(engine.stats(), _cpu() - cpu, wall)
    return outputs, (sum(len(o.token_ids) for o in outputs), wall, lat, ttft, figures)


def score(
    plan: list[dict], records: list[dict], expected: list, stats: Any, finished: dict[str, int]
) -> dict:
    """The checks of a served run against the offline outputs (see the module doc)."""
    by_index = {r["index"]: r for r in records}
    outcomes: dict[str, int] = {}
    lost, wrong, duplicated = [], [], []
    for item in plan:
        rec = by_index.get(item["index"], {"outcome": "missing"})
        outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
        if rec["outcome"] != "completed":
            if item["action"] == "complete":
                lost.append({"index": item["index"], "outcome": rec["outcome"], "error": rec.get("error")})
            continue
        want = expected[item["index"]]
        if rec["text"] != want.text or rec["finish_reason"] != want.finish_reason:
            wrong.append({"index": item["index"], "got": rec["text"][:80], "expected": want.text[:80]})
        extra_usage = item["stream"] and rec.get("usage_chunks") != 1
        if rec["finish_chunks"] != 1 or extra_usage or rec.get("completion_tokens") != len(want.token_ids):
            duplicated.append(item["index"])
    ended = sum(finished.values())
    return {
        "outcomes": outcomes,
        "lost": len(lost),
        "lost_examples": lost[:5],
        "wrong_outputs": len(wrong),
        "wrong_examples": wrong[:5],
        "duplicated": len(duplicated) + max(0, ended - len(plan)),
        "engine_finished": finished,
        "tracked_requests_after": stats.tracked_requests,
        "self_pages_used_after": stats.self_pages_used,
        "cross_pages_used_after": stats.cross_pages_used,
        "passed": not lost
        and not wrong
        and not duplicated
        and ended <= len(plan)
        and stats.tracked_requests == 0
        and stats.self_pages_used == 0
        and stats.cross_pages_used == 0,
    }


def run_serve_load(cfg: ServeLoadConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run the load test; write and return the results (see the module doc)."""
    import encdec
    from encdec.engine import Engine, EngineConfig
    from encdec.serving import ServerThread, build_app
    from encdec.serving.models import serve_engine

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda m: print(f"serve_load: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    bench_model = resolve_model(cfg.model, cfg.cache_dir)
    model = encdec.load_pretrained(bench_model.hf_dir, dtype=cfg.model.dtype)
    if model.tokenizer is None:
        raise ValueError(f"{bench_model.hf_dir} has no tokenizer: the completions API needs one")
    plan = make_plan(cfg, model.tokenizer, bench_model.token_range, bench_model.label)
    requests = [engine_request(item) for item in plan]
    max_in = max(len(model.tokenizer(r.inputs)["input_ids"]) for r in requests)
    options = dict(cfg.engine.options)
    config = EngineConfig(
        num_slots=cfg.num_slots,
        page_size=cfg.engine.page_size,
        max_encoder_len=cfg.engine.max_encoder_len or max_in,
        max_new_tokens=cfg.engine.max_new_tokens or max(r.max_new_tokens for r in requests),
        **options,
    )
    engine = Engine(model, config)
    say(f"compiling ({config.num_slots} slots)")
    engine.warmup(max_input_len=max_in)
    say(f"offline: Engine.generate on {len(requests)} requests")
    expected, offline = _offline(engine, requests)
    label = bench_model.label

    plan_path, client_path = out_dir / "plan.json", out_dir / "client_records.json"
    plan_path.write_text(json.dumps(plan))
    served = serve_engine(engine, name=label, max_pending=cfg.max_pending)
    try:
        with ServerThread(build_app(served)) as http:
            say(f"served: {cfg.concurrency} clients on {http.url}")
            served.engine.call(lambda e: e.reset_stats()).result()
            cpu = _cpu()
            command = [
                sys.executable,
                "-m",
                "encdec.bench.serve_client",
                http.url,
                str(plan_path),
                str(client_path),
            ]
            command += ["--concurrency", str(cfg.concurrency), "--time-limit", str(cfg.time_limit_s)]
            subprocess.run(command, check=True, timeout=cfg.time_limit_s + 120)
            deadline = time.monotonic() + 60
            while served.engine.snapshot().pending and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = served.engine.stats()
            snapshot = served.engine.snapshot()
            cpu = _cpu() - cpu
    finally:
        served.engine.shutdown(drain=False)
    offline_runs, agree = [offline], True
    if cfg.offline_again:
        say("offline again (the machine may be shared: the faster offline run is the baseline)")
        again, offline_after = _offline(engine, requests)
        offline_runs.append(offline_after)
        agree = [o.token_ids for o in again] == [o.token_ids for o in expected]
    best = max(offline_runs, key=lambda r: r[0] / r[1])
    runs = [_row("encdec-offline", cfg, label, *best)]
    records = json.loads(client_path.read_text())
    sent = [r for r in records if "t_send" in r]
    wall = max(r["t_done"] for r in sent) - min(r["t_send"] for r in sent)
    done = [r for r in sent if r["outcome"] == "completed"]
    lat = [r["t_done"] - r["t_send"] for r in done]
    ttft = [r["t_first"] - r["t_send"] for r in done if "t_first" in r]
    figures = _engine_figures(stats, cpu, wall)
    runs.append(_row("encdec-serve", cfg, label, snapshot.tokens_generated, wall, lat, ttft, figures))
    checks = score(plan, records, expected, stats, snapshot.finished)
    checks["completed_tokens_per_s"] = sum(r["completion_tokens"] for r in done) / wall
    checks["throughput_ratio"] = runs[1]["output_tokens_per_s"] / runs[0]["output_tokens_per_s"]
    checks["offline_tokens_per_s_runs"] = [r[0] / r[1] for r in offline_runs]
    checks["offline_runs_agree"] = agree
    checks["passed"] = checks["passed"] and checks["offline_runs_agree"]
    results = {
        "experiment": cfg.name,
        "description": cfg.description,
        "config": plain(dataclasses.asdict(cfg)),
        "machine": machine_info(),
        "runs": runs,
        "checks": checks,
    }
    from encdec.bench.plots import plot_serve_load

    write_results(results, out_dir, markdown=serve_load_table(results), plots=plot_serve_load)
    return results


def _f(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def serve_load_table(results: dict[str, Any]) -> str:
    lines = [
        "| system | requests | tok/s | p50 latency s | p99 latency s | TTFT p50 s | TTFT p99 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        keys = ("output_tokens_per_s", "p50_latency_s", "p99_latency_s", "ttft_p50_s", "ttft_p99_s")
        lines.append(f"| {r['system']} | {r['workload']} | " + " | ".join(_f(r[k]) for k in keys) + " |")
    c = results["checks"]
    lines += [
        "",
        f"served / offline throughput: {c['throughput_ratio']:.3f}; client outcomes: {c['outcomes']}",
        f"lost {c['lost']}, duplicated {c['duplicated']}, wrong outputs {c['wrong_outputs']}; after the run: "
        f"{c['tracked_requests_after']} tracked requests, {c['self_pages_used_after']} self and "
        f"{c['cross_pages_used_after']} cross pages in use; passed: {c['passed']}",
    ]
    return "\n".join(lines)
