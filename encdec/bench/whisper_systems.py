"""The systems of the long-form Whisper experiment, each timed from audio files to segments.

- ``encdec``: :class:`~encdec.whisper.longform.LongFormTranscriber` on the engine (files cut at
  silences, chunks decoded in parallel slots, timestamps, seeking, fallback);
- ``encdec_chunks``: the same, without timestamp tokens: each chunk (cut at silences, at most
  30 s) decoded once as one segment, faster-whisper's batched pipeline's algorithm;
- ``encdec_windows``: today's fixed 30 s windows through the engine, no timestamps
  (:func:`~encdec.whisper.serving.transcribe_with_engine`);
- ``faster_whisper``: faster-whisper's ``WhisperModel.transcribe`` with its defaults (one window
  at a time, timestamps, previous text, temperature fallback), ``beam_size`` as asked;
- ``faster_whisper_batched``: its ``BatchedInferencePipeline`` (Silero VAD chunks, ``batch_size``
  chunks of one file per batch, no timestamps: its defaults);
- ``ctranslate2``: CTranslate2's ``Whisper.generate`` on fixed 30 s windows of encdec's features,
  windows of many files batched together, no timestamps.

All load the same Whisper-base CTranslate2 directory, on ``threads`` CPU threads; the peers in
``compute_type`` (float32 unless asked).
Every runner returns, per file, its text and segments and when its first segment was known.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.bench.ctranslate2 import ct2_options
from encdec.whisper.audio import features_for
from encdec.whisper.longform import LongFormTranscriber
from encdec.whisper.options import LongFormOptions
from encdec.whisper.serving import longform_engine, transcribe_with_engine, whisper_engine
from encdec.whisper.tokens import WhisperTokens

LONGFORM_SYSTEMS = (
    "encdec", "encdec_chunks", "encdec_windows", "faster_whisper", "faster_whisper_batched", "ctranslate2",
)
PEER_COMPUTE_TYPES = ("float32", "int8", "int8_float32", "int16", "bfloat16", "int8_bfloat16")
"""CTranslate2's CPU compute types (faster-whisper passes its own through)."""


@dataclasses.dataclass
class FileOutput:
    text: str
    segments: list[tuple[float, float, str]]
    first_segment_s: float | None
    """Seconds from the start of the run to the file's first segment (None: no segment)."""
    language: str | None = None


class EncdecLongForm:
    def __init__(
        self,
        model,
        *,
        beam_size: int,
        language: str | None,
        num_slots: int,
        encoder_batch: int,
        steps_per_dispatch: int,
        vad: bool = True,
        condition_on_previous_text: bool = True,
        timestamps: bool = True,
    ):
        self.options = LongFormOptions(
            language=language,
            beam_size=beam_size,
            vad=vad,
            condition_on_previous_text=condition_on_previous_text,
            timestamps=timestamps,
        )
        self.engine = longform_engine(
            model,
            self.options,
            num_slots=num_slots,
            encoder_batch=encoder_batch,
            steps_per_dispatch=steps_per_dispatch,
        )
        self.transcriber = LongFormTranscriber(self.engine, self.options)

    def warmup(self, path: Path) -> None:
        self.engine.warmup()
        self([path])

    def __call__(self, paths: Sequence[Path]) -> list[FileOutput]:
        results = self.transcriber.transcribe([str(p) for p in paths])
        for r in results:
            if r.error:
                raise RuntimeError(f"encdec failed on {r.source}: {r.error}")
        return [
            FileOutput(
                r.text,
                [(s.start, s.end, s.text) for s in r.segments],
                r.timings.get("first_segment"),
                r.language,
            )
            for r in results
        ]


class EncdecWindows:
    def __init__(self, model, *, language: str, num_slots: int, encoder_batch: int, steps_per_dispatch: int):
        self.language = language
        self.engine = whisper_engine(
            model, num_slots=num_slots, encoder_batch=encoder_batch, steps_per_dispatch=steps_per_dispatch
        )

    def warmup(self, path: Path) -> None:
        self.engine.warmup()
        self([path])

    def __call__(self, paths: Sequence[Path]) -> list[FileOutput]:
        start = time.perf_counter()
        out = transcribe_with_engine(self.engine, [str(p) for p in paths], language=self.language)
        return [FileOutput(t.text, [], t.timings.get("done", start) - start) for t in out]


class FasterWhisper:
    """faster-whisper sequential (``batched=False``) or its ``BatchedInferencePipeline``."""

    def __init__(
        self,
        model_dir: Path,
        *,
        beam_size: int,
        language: str | None,
        threads: int,
        batched: bool = False,
        batch_size: int = 8,
        condition_on_previous_text: bool = True,
        compute_type: str = "float32",
    ):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.model = WhisperModel(
            str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads
        )
        self.pipeline = BatchedInferencePipeline(self.model) if batched else None
        self.kw: dict[str, Any] = {"beam_size": beam_size, "language": language}
        if batched:  # the pipeline never prompts with previous text
            self.kw["batch_size"] = batch_size
        else:
            self.kw["condition_on_previous_text"] = condition_on_previous_text

    def warmup(self, path: Path) -> None:
        self([path])

    def __call__(self, paths: Sequence[Path]) -> list[FileOutput]:
        start = time.perf_counter()
        outputs = []
        for path in paths:
            runner = self.pipeline or self.model
            segments, info = runner.transcribe(str(path), **self.kw)
            got, first = [], None
            for s in segments:  # a generator: decoding happens here
                if first is None:
                    first = time.perf_counter() - start
                got.append((s.start, s.end, s.text.strip()))
            text = " ".join(t for _, _, t in got if t)
            outputs.append(FileOutput(text, got, first, info.language))
        return outputs


class CT2Windows:
    """CTranslate2 ``Whisper.generate`` over fixed 30 s windows (encdec's features), ``batch``
    windows per call across files, greedy or beam, no timestamps."""

    def __init__(
        self, model, *, beam_size: int, language: str, threads: int, batch: int, compute_type: str = "float32"
    ):
        import ctranslate2

        self.ct2 = ctranslate2
        options = ct2_options("cpu", compute_type, threads)
        self.whisper = ctranslate2.models.Whisper(str(model.path), **options)
        self.tokens = WhisperTokens.from_dir(model.path)
        self.prompt = self.tokens.prompt(language)
        self.tokenizer, self.n_mels = model.tokenizer, model.config.num_mel_bins
        self.beam_size, self.batch, self.max_length = beam_size, batch, model.config.max_positions

    def warmup(self, path: Path) -> None:
        self([path])

    def __call__(self, paths: Sequence[Path]) -> list[FileOutput]:
        start = time.perf_counter()
        mels = [features_for(p, self.n_mels)[0] for p in paths]
        rows = [(i, w) for i, mel in enumerate(mels) for w in range(len(mel))]
        texts: dict[tuple[int, int], str] = {}
        done = [0.0] * len(paths)
        for b in range(0, len(rows), self.batch):
            part = rows[b : b + self.batch]
            batch = np.stack([mels[i][w] for i, w in part])
            results = self.whisper.generate(
                self.ct2.StorageView.from_array(batch),
                [self.prompt] * len(part),
                beam_size=self.beam_size,
                max_length=self.max_length,
            )
            for (i, w), r in zip(part, results, strict=True):
                texts[(i, w)] = self.tokens.decode(self.tokenizer, r.sequences_ids[0])
                done[i] = time.perf_counter() - start
        return [
            FileOutput(" ".join(t for w in range(len(mel)) if (t := texts[(i, w)])), [], done[i])
            for i, mel in enumerate(mels)
        ]


def make_longform_system(
    name: str,
    model,
    *,
    beam_size: int,
    language: str | None,
    threads: int,
    num_slots: int,
    encoder_batch: int,
    steps_per_dispatch: int,
    batch_size: int,
    condition_on_previous_text: bool = True,
    compute_type: str = "float32",
):
    """A runner: ``runner(paths) -> [FileOutput]`` with a ``warmup(path)``; the peers in
    ``compute_type``."""
    engine_kw = dict(num_slots=num_slots, encoder_batch=encoder_batch, steps_per_dispatch=steps_per_dispatch)
    prompt = condition_on_previous_text
    if name in ("encdec", "encdec_chunks"):
        return EncdecLongForm(
            model,
            beam_size=beam_size,
            language=language,
            condition_on_previous_text=prompt,
            timestamps=name == "encdec",
            **engine_kw,
        )
    if name == "encdec_windows":
        return EncdecWindows(model, language=language or "en", **engine_kw)
    if name in ("faster_whisper", "faster_whisper_batched"):
        batched = name == "faster_whisper_batched"
        return FasterWhisper(
            model.path,
            beam_size=beam_size,
            language=language,
            threads=threads,
            batched=batched,
            batch_size=batch_size,
            condition_on_previous_text=prompt,
            compute_type=compute_type,
        )
    if name == "ctranslate2":
        lang = language or "en"
        return CT2Windows(
            model, beam_size=beam_size, language=lang, threads=threads, batch=num_slots,
            compute_type=compute_type,
        )
    raise ValueError(f"unknown system {name!r}; known: {', '.join(LONGFORM_SYSTEMS)}")
