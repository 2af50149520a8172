"""``encdec transcribe FILES...``: long-form transcription of audio files into text and subtitles.

Every file goes through one engine (:mod:`encdec.whisper.longform`): files and their chunks are
decoded in parallel slots. Each file's transcript is printed as ``FILE<TAB>text`` on stdout and,
with ``--output-format`` or ``--output-dir``, written as ``DIR/<name>.<format>`` the moment it is
complete. A progress bar counts files on stderr (on a terminal). A file that cannot be read, is
empty or silent, or cannot be written is reported on stderr and the others are transcribed
(exit status 2 if any failed); a bad option (an unknown language, an output directory that
cannot be written) stops the call before any audio is read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from encdec.lora import AdapterBank, AdapterError, load_peft
from encdec.whisper.longform import LongFormTranscriber
from encdec.whisper.options import LongFormOptions
from encdec.whisper.segments import Transcription
from encdec.whisper.serving import longform_engine
from encdec.whisper.subtitles import OutputDirError, check_output_dir, write_transcription
from encdec.whisper.transcribe import load_whisper

ADAPTER_ID = "adapter"
"""The bank id of ``--adapter DIR``."""


def transcribe_cli(args: argparse.Namespace) -> int:
    """Run ``encdec transcribe`` with the parsed arguments (``encdec.cli`` defines them)."""
    start = time.perf_counter()
    fmt = args.output_format or ("txt" if args.output_dir else None)
    try:
        out_dir = check_output_dir(args.output_dir or ".") if fmt else None
    except OutputDirError as e:
        print(f"encdec transcribe: error: {e}", file=sys.stderr)
        return 2
    step = args.temperature_increment_on_fallback
    temperatures = tuple(np.arange(0.0, 1.0 + 1e-6, step)) if step > 0 else (0.0,)
    options = LongFormOptions(
        temperatures=tuple(round(float(t), 6) for t in temperatures),
        language=None if args.language == "auto" else args.language,
        task=args.task,
        beam_size=args.beam_size,
        vad=not args.no_vad,
        condition_on_previous_text=not args.no_condition_on_previous_text,
        initial_prompt=args.initial_prompt,
        adapter=ADAPTER_ID if args.adapter else None,
    )
    model = load_whisper(args.model, quantize=getattr(args, "quantize", None))
    bank, lora = None, None
    if args.adapter:
        try:
            lora, _ = load_peft(args.adapter, model.params, model.config)
        except AdapterError as e:
            print(f"encdec transcribe: error: --adapter {args.adapter}: {e}", file=sys.stderr)
            return 2
        bank = AdapterBank.for_adapters(model.params, model.config, [lora])
    sampling = len(options.temperatures) > 1
    slots = max(args.num_slots, options.beam_size, options.best_of if sampling else 1)
    engine = longform_engine(model, options, num_slots=slots, adapters=bank)
    if lora is not None:
        engine.load_adapter(ADAPTER_ID, lora)
    transcriber = LongFormTranscriber(engine, options)  # an unknown language fails here
    names = _output_names(args.files)
    failed = 0

    from tqdm import tqdm

    bar = tqdm(total=len(args.files), unit="file", desc="transcribe", disable=None, file=sys.stderr)

    def done(t: Transcription) -> None:
        nonlocal failed
        bar.update()
        if t.error is None and out_dir is not None:
            try:
                write_transcription(t, out_dir, fmt, name=names[t.source])
            except OSError as e:
                t.error = f"cannot write its {fmt} file: {e}"
        if t.error is not None:
            failed += 1
            bar.write(f"encdec transcribe: error: {t.source}: {t.error}", file=sys.stderr)

    results = transcriber.transcribe(list(args.files), on_done=done)
    bar.close()
    for t in results:
        if t.error is None:
            print(f"{t.source}\t{t.text}")
    seconds = sum(t.duration for t in results)
    print(
        f"{len(results) - failed} of {len(results)} file(s), {seconds:.1f} s of audio in "
        f"{time.perf_counter() - start:.1f} s (model load and compile included)",
        file=sys.stderr,
    )
    return 2 if failed else 0


def _output_names(files: list[str]) -> dict[str, str]:
    """Each file's output name: its name without extension, made unique with ``-2``, ``-3``..."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for f in files:
        stem = Path(f).stem or "audio"
        name, k = stem, 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name)
        names[f] = name
    return names
