"""Reserve-at-admission against incremental pages under one KV budget, on requests that stop early.

    python scripts/kv_policies.py [--shape t5-small] [--requests 96] [--slots 32]

The KV budget fits ``--fit`` (8) full-length sequences: each request may write ``--max-new``
tokens, but stops (a stop token, as a trained model stops at EOS) after 4 to 48. Reserve gives
every admitted request pages for its whole budget; incremental gives pages as tokens arrive and
preempts when the pool runs dry. Each policy splits the same byte budget between its pools as
its requests use them. Prints concurrency, throughput and whether every output is identical.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import encdec
from encdec.bench.config import ModelSpec
from encdec.bench.models import resolve_model
from encdec.cache.pools import PoolConfig
from encdec.engine import Engine, EngineConfig, Request


def early_stopping_requests(model, n: int, in_len: int, max_new: int, seed: int) -> list[Request]:
    """Requests that stop where their greedy output first reaches a chosen token (4-48 steps in)."""
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(10, 30000, in_len).tolist() for _ in range(n)]
    stops = rng.integers(4, 49, n)
    probe = Engine(model, EngineConfig(num_slots=16, max_encoder_len=in_len, max_new_tokens=max_new,
                                       encoder_buckets=(in_len,)))
    pairs = zip(inputs, stops, strict=True)
    outs = probe.generate([Request(x, max_new_tokens=int(s), min_new_tokens=int(s)) for x, s in pairs])
    return [
        Request(x, max_new_tokens=max_new, stop_token_ids=[o.token_ids[-1]])
        for x, o in zip(inputs, outs, strict=True)
    ]


def run(model, requests, config: EngineConfig) -> dict:
    engine = Engine(model, config)
    engine.warmup(max_input_len=len(requests[0].inputs))
    t0 = time.perf_counter()
    outs = engine.generate(requests)
    wall = time.perf_counter() - t0
    stats = engine.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "outputs": [o.token_ids for o in outs],
        "tok/s": tokens / wall,
        "mean busy slots": stats.mean_busy_slots,
        "peak busy slots": max(b for _, b in stats.slot_occupancy),
        "preemptions": stats.preemptions,
        "wall s": wall,
        "tokens": tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="t5-small")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--fit", type=int, default=8, help="full-length sequences the KV budget holds")
    p.add_argument("--in-len", type=int, default=64)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "encdec" / "bench"))
    args = p.parse_args()
    bench = resolve_model(ModelSpec(shape=args.shape), Path(args.cache))
    model = encdec.load_pretrained(bench.hf_dir, tokenizer=False)
    requests = early_stopping_requests(model, args.requests, args.in_len, args.max_new, seed=0)
    G = args.page_size
    page = PoolConfig.from_pages(model.config, page_size=G, num_self_pages=2, num_cross_pages=2).page_bytes
    cross, full_self = -(-args.in_len // G), -(-(args.max_new) // G)
    budget = args.fit * (cross + full_self) * page
    base = dict(num_slots=args.slots, page_size=G, max_encoder_len=args.in_len, max_new_tokens=args.max_new,
                encoder_buckets=(args.in_len,), memory_budget_bytes=budget, cross_kv_reuse=False)
    expected_self = cross + -(-28 // G)  # a request's pages at its mean length
    results = {
        "reserve": run(model, requests, EngineConfig(**base, cross_kv_fraction=cross / (cross + full_self))),
        "incremental": run(
            model, requests,
            EngineConfig(**base, kv_allocation="incremental", cross_kv_fraction=cross / expected_self),
        ),
    }
    same = results["reserve"]["outputs"] == results["incremental"]["outputs"]
    print(f"{args.shape}, {args.requests} requests of {args.in_len} tokens stopping after 4-48 of at most "
          f"{args.max_new}, {args.slots} slots, KV budget {budget / 2**20:.1f} MiB "
          f"(fits {args.fit} full sequences)")
    print("| policy | tok/s | mean busy slots | peak busy slots | preemptions | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tok/s']:.1f} | {r['mean busy slots']:.1f} | {r['peak busy slots']} | "
              f"{r['preemptions']} | {r['wall s']:.1f} |")
    inc, res = results["incremental"], results["reserve"]
    print(f"incremental / reserve: throughput {inc['tok/s'] / res['tok/s']:.2f}x, "
          f"concurrency {inc['mean busy slots'] / res['mean busy slots']:.2f}x; outputs identical: {same}")


if __name__ == "__main__":
    main()
