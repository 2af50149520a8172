"""The decode step at 8 busy slots under several settings, alternated: an A/B on a noisy machine.

    python scripts/decode_step_ab.py --shape bart-base --rounds 3 \
        ENCDEC_HUGE_PAGES=0 ENCDEC_HUGE_PAGES=1 [--quantize int8]

Each setting (``NAME=VALUE[,NAME=VALUE]``, environment variables the engine reads; ``-`` for
none) runs in a fresh process per round, in turn, so a neighbour's load on the machine falls on
every setting alike. A process builds the shape's engine (random weights, as the bench), times
the step as the bench does (:func:`encdec.bench.systems.decode_step_times`: every dispatch waited
on, five runs of 8 requests of 64 input and 64 output tokens, each dispatch's fastest; ``--lengths``
sets those and the engine's limits) ``--probes`` times, and prints the fastest with the fastest
whole run and the weight floor at the bandwidth probed beside it.
"""

import argparse
import json
import os
import subprocess
import sys


def measure(shape: str, quantize: str | None, probes: int, lengths: tuple[int, int, int, int]) -> dict:
    import numpy as np

    import encdec
    from encdec.bench.bandwidth import decode_weight_bytes, floor_ms, measure_bandwidth
    from encdec.bench.shapes import write_shape
    from encdec.bench.systems import decode_step_times
    from encdec.engine import Engine, EngineConfig, Request

    input_len, output_len, max_encoder_len, max_new_tokens = lengths
    model = encdec.load_pretrained(str(write_shape(shape, 0)), quantize=quantize)
    limits = {"max_encoder_len": max_encoder_len, "max_new_tokens": max_new_tokens}
    engine = Engine(model, EngineConfig(num_slots=8, page_size=16, **limits))
    engine.warmup(max_input_len=max_encoder_len)
    rng = np.random.default_rng(0)
    low, high = 10, min(1000, model.config.vocab_size)
    requests = [
        Request(
            inputs=[int(t) for t in rng.integers(low, high, input_len)],
            max_new_tokens=output_len, min_new_tokens=output_len,
        )
        for _ in range(8)
    ]
    best = None
    for _ in range(probes):
        reads: list[float] = []

        def read(reads: list[float] = reads) -> None:
            reads.append(measure_bandwidth(numpy_copy=False)["jax_read_GBps"])

        times = decode_step_times(engine, requests, between=read)
        bandwidth = max(reads)
        if best is None or times.dispatch_ms < best["step_ms"]:
            best = {"step_ms": times.dispatch_ms, "run_ms": times.run_ms, "GBps": bandwidth}
    best["floor_ms"] = floor_ms(decode_weight_bytes(model.params, model.config), best["GBps"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("settings", nargs="+", help="NAME=VALUE[,NAME=VALUE] per setting, or - for none")
    parser.add_argument("--shape", default="bart-base", help="a bench shape (encdec.bench.shapes)")
    parser.add_argument("--quantize", default=None, choices=[None, "int8"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=3, help="step timings per process (the fastest)")
    parser.add_argument(
        "--lengths", default="64,64,64,64",
        help="input, output, max_encoder_len, max_new_tokens: the requests' lengths and the engine's",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child's run
    args = parser.parse_args()
    lengths = tuple(int(x) for x in args.lengths.split(","))
    if len(lengths) != 4:
        parser.error(f"--lengths is four integers, not {args.lengths!r}")
    if args.one:
        print(json.dumps(measure(args.shape, args.quantize, args.probes, lengths)))
        return
    envs = []
    for setting in args.settings:
        pairs = [] if setting == "-" else [p.split("=", 1) for p in setting.split(",")]
        if any(len(p) != 2 or not p[0] for p in pairs):
            parser.error(f"a setting is NAME=VALUE[,NAME=VALUE] or -, not {setting!r}")
        envs.append(dict(pairs))
    child = [
        sys.executable, __file__, "-", "--one", "--shape", args.shape, "--probes", str(args.probes),
        "--lengths", args.lengths,
    ]
    if args.quantize:
        child += ["--quantize", args.quantize]
    dtype = args.quantize or "float32"
    print(f"{args.shape} {dtype}, 8 slots: step ms / run step ms (floor ms, GB/s), fastest of {args.probes}")
    for r in range(args.rounds):
        cells = []
        for setting, env in zip(args.settings, envs, strict=True):
            out = subprocess.run(child, env={**os.environ, **env}, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{setting}: the measuring process failed:\n{out.stderr[-2000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            step = f"{got['step_ms']:.2f} / {got['run_ms']:.2f}"
            cells.append(f"{setting}: {step} ({got['floor_ms']:.2f}, {got['GBps']:.1f})")
        print(f"round {r + 1}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
