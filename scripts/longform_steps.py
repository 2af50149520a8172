"""Decode work of long-form Whisper, counted rather than timed (for loaded machines).

    python scripts/longform_steps.py [--files 60 90] [--no-previous-text]

Runs the whisper_longform experiment's encdec system (greedy, 16 slots) over its long recording
and the given files once after a warm-up, and prints the engine's dispatches and decode steps,
the process CPU seconds (all threads) and the words transcribed, as JSON. Step counts do not
depend on the machine's load; CPU seconds depend on it far less than wall time.
"""

import argparse
import json
import time

from encdec.bench.whisper_longform import LongFormExperimentConfig, recordings_for
from encdec.bench.whisper_systems import EncdecLongForm
from encdec.whisper.transcribe import load_whisper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=float, nargs="*", default=[60.0, 90.0], help="file lengths, s")
    parser.add_argument("--no-previous-text", action="store_true")
    args = parser.parse_args()
    cfg = LongFormExperimentConfig(file_seconds=tuple(args.files))
    long, files = recordings_for(cfg)
    system = EncdecLongForm(
        load_whisper(None),
        beam_size=1,
        language="en",
        num_slots=16,
        encoder_batch=4,
        steps_per_dispatch=4,
        condition_on_previous_text=not args.no_previous_text,
    )
    system.warmup(files[0].path)
    system.engine.reset_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    out = system([long.path, *(f.path for f in files)])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = system.engine.stats()
    audio = long.seconds + sum(f.seconds for f in files)
    report = {
        "audio_s": audio,
        "wall_s": wall,
        "cpu_s": cpu,
        "audio_s_per_cpu_s": audio / cpu,
        "dispatches": stats.dispatches,
        "decode_steps": stats.decode_steps,
        "encode_batches": stats.encode_batches,
        "words": sum(len(o.text.split()) for o in out),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
