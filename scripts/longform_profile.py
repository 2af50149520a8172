"""Where long-form Whisper's time goes: encode, decode and the host, and how busy the slots are.

    python scripts/longform_profile.py [--long] [--chunks] [--quantize bfloat16] [--slots 16]

Runs the whisper_longform experiment's encdec system (greedy) over its 16 files (or, with
``--long``, its long recording) once after a warm-up. Each encode batch and decode dispatch is
waited for, so the split is exact but the total is a little longer than a free-running one.
Prints JSON: the wall seconds of each phase, decode steps and the slots active per step (mean,
and in ten stretches of the run), windows and generated tokens by temperature.
"""

import argparse
import collections
import json
import time

import jax
import numpy as np

from encdec.bench.whisper_longform import LongFormExperimentConfig, recordings_for
from encdec.bench.whisper_systems import EncdecLongForm
from encdec.whisper.transcribe import load_whisper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long", action="store_true", help="the long recording, not the files")
    parser.add_argument("--chunks", action="store_true", help="no timestamps: one decode per chunk")
    parser.add_argument("--quantize", default=None, help="encdec's weights: int8 or bfloat16")
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args()
    cfg = LongFormExperimentConfig()
    long, files = recordings_for(cfg)
    system = EncdecLongForm(
        load_whisper(None, quantize=args.quantize),
        beam_size=1,
        language="en",
        num_slots=args.slots,
        encoder_batch=cfg.encoder_batch,
        steps_per_dispatch=cfg.steps_per_dispatch,
        timestamps=not args.chunks,
    )
    engine, transcriber = system.engine, system.transcriber
    seconds: collections.Counter = collections.Counter()
    active: list[list[int]] = []
    windows: collections.Counter = collections.Counter()
    tokens: collections.Counter = collections.Counter()

    def timed(name, fn, wait):
        def run(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            jax.block_until_ready(wait(out))
            seconds[name] += time.perf_counter() - start
            return out

        run._cache_size = getattr(fn, "_cache_size", None)
        return run

    engine._encode = timed("encode", engine._encode, lambda state: state)
    engine._decode = timed("decode", engine._decode, lambda out: out)
    read, attempt = engine._read, transcriber._attempt

    def read_counting(results, owners):
        active.append((np.asarray(results.tokens_SB) >= 0).sum(axis=1).tolist())
        return read(results, owners)

    def attempt_counting(st, index, out):
        t = transcriber.options.temperatures[index]
        windows[t] += 1
        tokens[t] += sum(len(s.token_ids) for s in out.sequences or [out])
        return attempt(st, index, out)

    engine._read, transcriber._attempt = read_counting, attempt_counting
    system.warmup(files[0].path)
    for counter in (seconds, windows, tokens):
        counter.clear()
    active.clear()
    paths = [long.path] if args.long else [f.path for f in files]
    audio = long.seconds if args.long else sum(f.seconds for f in files)
    start = time.perf_counter()
    system(paths)
    wall = time.perf_counter() - start
    steps = [n for dispatch in active for n in dispatch]
    stretches = np.array_split(np.asarray(steps, float), 10) if steps else []
    report = {
        "audio_s": round(audio, 1),
        "wall_s": round(wall, 2),
        "audio_s_per_s": round(audio / wall, 2),
        "encode_s": round(seconds["encode"], 2),
        "decode_s": round(seconds["decode"], 2),
        "host_s": round(wall - seconds["encode"] - seconds["decode"], 2),
        "decode_steps": len(steps),
        "mean_active_slots": round(float(np.mean(steps)), 2) if steps else None,
        "active_slots_by_tenth": [round(float(s.mean()), 1) for s in stretches if s.size],
        "windows_by_temperature": dict(windows),
        "tokens_by_temperature": dict(tokens),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
