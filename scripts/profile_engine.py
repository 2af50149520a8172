"""Where an engine run's time goes: one workload of an experiment through the in-flight engine.

    python scripts/profile_engine.py experiments/bench_cpu.yaml --model 0 --workload mixed \
        [--steps-per-dispatch 4] [--attention-impl auto] [--dtype int8] [--window-dtype bfloat16]

Runs the trace twice after a warm-up: once as the benchmark does (asynchronous dispatches,
throughput printed), once with every decode and encode dispatch waited on and timed, which
splits the wall time into decode and encoder work.
"""

import argparse
import collections
import time

import jax
import numpy as np

import encdec
from encdec.bench.config import load_experiment
from encdec.bench.models import resolve_model
from encdec.bench.workloads import make_trace
from encdec.engine import Engine, EngineConfig, Request


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("--model", type=int, default=0, help="index into the experiment's models")
    parser.add_argument("--workload", default=None, help="workload name (default: the first)")
    parser.add_argument("--slots", type=int, default=None, help="default: the experiment's first")
    parser.add_argument("--steps-per-dispatch", type=int, default=4)
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--dtype", default=None, help="override the model's dtype (int8: int8 weights)")
    parser.add_argument("--window-dtype", default=None, choices=("float32", "bfloat16"),
                        help="the K/V window decode attention reads (EngineConfig.window_dtype)")
    args = parser.parse_args()

    cfg = load_experiment(args.experiment)
    spec = cfg.models[args.model]
    workload = next(w for w in cfg.workloads if args.workload in (None, w.name))
    bench_model = resolve_model(spec, cfg.cache_dir)
    model = encdec.load_pretrained(bench_model.hf_dir, dtype=args.dtype or spec.dtype, tokenizer=False)
    max_in = None if model.config.position == "relative" else model.config.max_positions
    trace = make_trace(workload, bench_model.token_range, max_input_len=max_in)
    engine = Engine(
        model,
        EngineConfig(
            num_slots=args.slots or cfg.num_slots[0], page_size=cfg.engine.page_size,
            max_encoder_len=trace.max_input_len, max_new_tokens=trace.max_output_len,
            steps_per_dispatch=args.steps_per_dispatch, attention_impl=args.attention_impl,
            window_dtype=args.window_dtype,
        ),
    )
    engine.warmup(max_input_len=trace.max_input_len)
    requests = [
        Request(inputs=list(r.input_ids), max_new_tokens=r.output_len, min_new_tokens=r.output_len)
        for r in trace.requests
    ]
    engine.generate(requests[: engine.config.num_slots])  # compiles nothing new; warms caches

    engine.reset_stats()
    t0 = time.perf_counter()
    outputs = engine.generate(requests)
    wall = time.perf_counter() - t0
    stats = engine.stats()
    tokens = sum(len(o.token_ids) for o in outputs)
    busy = np.mean([b for _, b in stats.slot_occupancy])
    print(f"{bench_model.label} {workload.name}: {tokens / wall:.0f} tok/s ({tokens} tokens, {wall:.2f} s), "
          f"{stats.dispatches} dispatches of {stats.decode_steps} steps, {stats.encode_batches} "
          f"encoder batches, {busy:.2f} of {engine.config.num_slots} slots busy per dispatch")

    timed: dict[str, list[float]] = collections.defaultdict(list)

    def waited(name, fn):
        def call(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            jax.block_until_ready(out)
            key = name if name == "decode" else f"encode {tuple(a[2].shape)}"  # a[2]: the encoder batch
            timed[key].append(time.perf_counter() - start)
            return out

        return call

    jitted = engine._decode, engine._encode
    engine._decode, engine._encode = waited("decode", engine._decode), waited("encode", engine._encode)
    t0 = time.perf_counter()
    engine.generate(requests)
    wall = time.perf_counter() - t0
    engine._decode, engine._encode = jitted
    decode = timed.pop("decode")
    steps = engine.stats().decode_steps - stats.decode_steps
    encode = sum(sum(v) for v in timed.values())
    print(f"waited on every dispatch: {wall:.2f} s; decode {sum(decode):.2f} s "
          f"({sum(decode) / steps * 1e3:.1f} ms per step), encode {encode:.2f} s")
    for key, times in sorted(timed.items()):
        print(f"  {key}: {len(times)} x {np.median(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
