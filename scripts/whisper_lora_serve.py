"""Whisper-base with two trained adapters (two voices) and no adapter, served from one engine.

Every held-out clip of each adapter's experiment (its target voice, and the shared ``en-us``
control) is sent three times, with no adapter and with each adapter, in one shuffled batch of
mixed traffic through one engine and its adapter bank. Prints the WER of every (voice, adapter)
pair, checks the engine's tokens against greedy decoding with each adapter merged into the base
(the first ``--check`` clips of every voice), and that loading the second adapter after warm-up
compiled nothing. Run (after training both adapters with ``encdec finetune``):

    python scripts/whisper_lora_serve.py --adapter fr=results/whisper_lora/adapter \
        --adapter de=results/whisper_lora_de/adapter
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a PEFT adapter written by encdec finetune (OUT/adapter; OUT/config.yaml names its voice)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N held-out clips per voice")
    parser.add_argument("--check", type=int, default=4, help="clips per voice checked against merged weights")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--num-slots", type=int, default=8)
    args = parser.parse_args(argv)

    import dataclasses

    import numpy as np

    from encdec.engine import Request
    from encdec.lora import AdapterBank, load_peft, merge_adapter
    from encdec.whisper import AudioInput, load_audio, log_mel_spectrogram, whisper_engine
    from encdec.whisper.accent import build_split
    from encdec.whisper.clips import wer
    from encdec.whisper.finetune import load_config
    from encdec.whisper.tokens import WhisperTokens
    from encdec.whisper.transcribe import greedy_decode, load_whisper

    named = {}
    for spec in args.adapter:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            parser.error(f"--adapter {spec!r}: expected NAME=DIR")
        named[name] = Path(directory)
    model = load_whisper(None)
    tokens = WhisperTokens.from_dir(model.path)
    prompt = tokens.prompt("en", "transcribe")
    loras, clips = {}, {}
    for name, directory in named.items():
        loras[name], _ = load_peft(directory, model.params, model.config)
        split = build_split(load_config(directory.parent / "config.yaml").data)
        clips[split.eval_target[0].voice] = list(split.eval_target[: args.limit])
        clips.setdefault(split.eval_control[0].voice, list(split.eval_control[: args.limit]))

    bank = AdapterBank.for_adapters(model.params, model.config, list(loras.values()))
    engine = whisper_engine(model, adapters=bank, num_slots=args.num_slots)
    first, *rest = loras
    engine.load_adapter(first, loras[first])
    t = time.perf_counter()
    warm = engine.warmup()
    print(f"warm-up: {time.perf_counter() - t:.1f} s; then loading {rest} after it")
    for name in rest:
        engine.load_adapter(name, loras[name])

    choices = [None, *loras]
    jobs = [(voice, i, a) for voice, cs in clips.items() for i in range(len(cs)) for a in choices]
    random.Random(0).shuffle(jobs)  # mixed traffic: every batch mixes voices and adapters
    requests = [
        Request(AudioInput(str(clips[v][i].path)), max_new_tokens=args.max_new_tokens, adapter_id=a)
        for v, i, a in jobs
    ]
    audio_seconds = sum(len(load_audio(clips[v][i].path)) / 16000 for v, i, _ in jobs)
    t = time.perf_counter()
    outputs = engine.generate(requests)
    seconds = time.perf_counter() - t
    recompiled = engine.compile_counts() != warm
    rate = audio_seconds / seconds
    print(f"{len(requests)} requests, {audio_seconds:.0f} s of audio in {seconds:.1f} s ({rate:.1f} s/s)")
    print(f"recompiled after warm-up: {'YES' if recompiled else 'no'}")

    got = {(v, i, a): o for (v, i, a), o in zip(jobs, outputs, strict=True)}
    header = " | ".join(["no adapter", *choices[1:]])
    print(f"\n| voice | clips | {header} |\n|---|---|{'---|' * len(choices)}")
    for voice, cs in clips.items():
        refs = [c.text for c in cs]
        row = [
            f"{100 * wer(refs, [got[voice, i, a].text or '' for i in range(len(cs))]):.1f}%" for a in choices
        ]
        print(f"| {voice} | {len(cs)} | {' | '.join(row)} |")

    same = total = 0
    for a in choices:
        merged = (
            model if a is None else dataclasses.replace(model, params=merge_adapter(model.params, loras[a]))
        )
        for voice, cs in clips.items():
            checked = cs[: args.check]
            mel = np.stack(
                [log_mel_spectrogram(load_audio(c.path), model.config.num_mel_bins) for c in checked]
            )
            expected = greedy_decode(merged, mel, tokens, prompt, max_new_tokens=args.max_new_tokens)[0]
            for i, want in enumerate(expected):
                mine = [x for x in got[voice, i, a].token_ids if x != tokens.eot]
                total += 1
                same += mine == want
                if mine != want:
                    print(f"differs from the merged reference: {voice} clip {i}, adapter {a}")
    print(f"\nengine tokens equal to the merged reference: {same} of {total} (voice, clip, adapter) triples")
    return 0 if same == total and not recompiled else 1


if __name__ == "__main__":
    sys.exit(main())
