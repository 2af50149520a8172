"""The long-form Whisper experiment: encdec vs faster-whisper and CTranslate2 on the same weights.

Recordings: the King James Bible read by espeak-ng (:mod:`encdec.whisper.recordings`): one long
recording (``long_seconds``, at least 3 minutes) and ``file_seconds`` files (16 of 30–120 s by
default), from different verses. Every run (``system:beam``, e.g. ``encdec:5``) transcribes the
long recording alone, then all the files in one call, each timed once after a warm-up on the
first file. Figures, per run: audio seconds per second, word error rate against the verses
(``jiwer``, on lower-cased words without punctuation), time to the first segment, and on the
long recording whether the segments' times are monotone and inside the audio and how many
verses were lost (under half their words recognized). Runs are in the listed order: pairs to
compare sit next to each other, so a busy machine burdens both alike.

Run it with ``encdec run experiments/whisper_longform.yaml``; writes ``results.json`` and
``results.md`` (:mod:`encdec.bench.results`).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encdec.bench.machine import machine_info
from encdec.bench.results import write_results
from encdec.bench.whisper_systems import (
    LONGFORM_SYSTEMS,
    PEER_COMPUTE_TYPES,
    FileOutput,
    make_longform_system,
)
from encdec.experiment_config import ConfigError, build, read_yaml
from encdec.whisper.clips import normalize
from encdec.whisper.recordings import Recording, kjv_verses, long_recordings
from encdec.whisper.transcribe import load_whisper


@dataclasses.dataclass(frozen=True)
class LongFormExperimentConfig:
    name: str = "whisper_longform"
    """Names the default output folder ``results/<name>``."""
    model: str | None = None
    """HF or CTranslate2 Whisper directory; ``None`` fetches Whisper-base into the cache."""
    recordings_dir: str | None = None
    """Where recordings are cached; None: ``$ENCDEC_CACHE/recordings`` (``~/.cache/encdec``)."""
    long_seconds: float = 200.0
    """The long recording's length (at least this)."""
    file_seconds: tuple[float, ...] = tuple(30.0 + 6.0 * i for i in range(16))
    """One file per length, for the throughput runs."""
    voice: str = "en-us"
    speed: int = 160
    pause: float = 0.4
    """Seconds of silence between verses."""
    language: str | None = "en"
    """Given to every system; None: each detects it."""
    runs: tuple[str, ...] = (
        "encdec:1",
        "faster_whisper_batched:1",
        "encdec:5",
        "faster_whisper:5",
        "faster_whisper:1",
        "ctranslate2:1",
    )
    """``system:beam_size`` in order; systems: ``encdec``, ``encdec_windows``, ``faster_whisper``,
    ``faster_whisper_batched``, ``ctranslate2``."""
    threads: int = 2
    """CPU threads of faster-whisper and CTranslate2 (match the cores JAX uses)."""
    num_slots: int = 16
    """encdec decode slots; CTranslate2's windows per batch."""
    encoder_batch: int = 4
    steps_per_dispatch: int = 4
    batch_size: int = 8
    """faster-whisper ``BatchedInferencePipeline`` chunks per batch (its default)."""
    quantize: str | None = None
    """encdec's weights (``load_pretrained``'s ``quantize``): None (float32 as loaded), ``int8`` or
    ``bfloat16``. The peers load their own, in ``peer_compute_type``."""
    peer_compute_type: str = "float32"
    """faster-whisper's and CTranslate2's ``compute_type`` on the same file: ``int8`` beside
    ``quantize: int8`` is faster-whisper's usual CPU setting."""
    condition_on_previous_text: bool = True
    """encdec and sequential faster-whisper prompt each window with the text decoded before it
    (both tools' default). faster-whisper's batched pipeline never does: set False to compare
    like with like (and to skip feeding up to 224 prompt tokens per window)."""

    def __post_init__(self):
        for run in self.runs:
            system, _, beam = run.partition(":")
            if system not in LONGFORM_SYSTEMS or not beam.isdigit() or int(beam) < 1:
                known = ", ".join(LONGFORM_SYSTEMS)
                raise ValueError(f"runs: {run!r} is not system:beam_size with a system in {known}")
        if self.peer_compute_type not in PEER_COMPUTE_TYPES:
            raise ValueError(
                f"peer_compute_type: {self.peer_compute_type!r} is not one of {', '.join(PEER_COMPUTE_TYPES)}"
            )

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> LongFormExperimentConfig:
        raw = read_yaml(path)
        kind = raw.pop("kind", None)
        if kind != "whisper_longform":
            raise ConfigError("kind", f"{path} is not a whisper_longform experiment (kind: {kind!r})")
        return build(cls, raw, overrides)


def recordings_for(cfg: LongFormExperimentConfig) -> tuple[Recording, list[Recording]]:
    """The long recording and the files (synthesized once, then read from the cache)."""
    root = cfg.recordings_dir or os.path.join(
        os.environ.get("ENCDEC_CACHE") or Path.home() / ".cache" / "encdec", "recordings"
    )
    verses = kjv_verses()
    kw = dict(voice=cfg.voice, speed=cfg.speed, pause=cfg.pause, verses=verses)
    (long,) = long_recordings([cfg.long_seconds], root, **kw)
    files = long_recordings(cfg.file_seconds, root, first_verse=len(long.verses), **kw)
    return long, files


def run_longform_experiment(cfg: LongFormExperimentConfig, out_dir: str | Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    long, files = recordings_for(cfg)
    model = load_whisper(cfg.model, quantize=cfg.quantize)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(),
        "long": {"path": str(long.path), "seconds": long.seconds, "verses": len(long.verses)},
        "files": {"count": len(files), "seconds": sum(r.seconds for r in files)},
        "runs": [],
    }
    for run in cfg.runs:
        system, _, beam = run.partition(":")
        runner = make_longform_system(
            system,
            model,
            beam_size=int(beam),
            language=cfg.language,
            threads=cfg.threads,
            num_slots=cfg.num_slots,
            encoder_batch=cfg.encoder_batch,
            steps_per_dispatch=cfg.steps_per_dispatch,
            batch_size=cfg.batch_size,
            condition_on_previous_text=cfg.condition_on_previous_text,
            compute_type=cfg.peer_compute_type,
        )
        runner.warmup(files[0].path)
        row: dict[str, Any] = {"run": run, "system": system, "beam_size": int(beam)}
        wall, (out,) = _timed(runner, [long.path])
        row["long"] = {**score_long(long, out), "seconds": wall, "audio_s_per_s": long.seconds / wall}
        wall, outs = _timed(runner, [r.path for r in files])
        row["files"] = {
            "seconds": wall,
            "audio_s_per_s": results["files"]["seconds"] / wall,
            "wer": word_error_rate([r.text for r in files], [o.text for o in outs]),
            "texts": [o.text for o in outs],
        }
        results["runs"].append(row)
        write_results(results, out_dir)
        del runner
        gc.collect()
    results["ratios"] = ratios(results["runs"])
    write_results(results, out_dir, markdown=longform_table(results))
    return results


def _timed(runner, paths) -> tuple[float, list[FileOutput]]:
    start = time.perf_counter()
    out = runner(paths)
    return time.perf_counter() - start, out


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (``jiwer``) on :func:`~encdec.whisper.clips.normalize`d words."""
    import jiwer

    refs = [" ".join(normalize(r)) for r in references]
    hyps = [" ".join(normalize(h)) for h in hypotheses]
    return jiwer.wer(refs, hyps)


def lost_verses(recording: Recording, hypothesis: str) -> list[int]:
    """Verses of which fewer than half the words were recognized (aligned as equal)."""
    import jiwer

    owner = [i for i, v in enumerate(recording.verses) for _ in normalize(v)]
    right = [0] * len(recording.verses)
    ref, hyp = " ".join(normalize(recording.text)), " ".join(normalize(hypothesis))
    for chunk in jiwer.process_words(ref, hyp or "<empty>").alignments[0]:
        if chunk.type == "equal":
            for k in range(chunk.ref_start_idx, chunk.ref_end_idx):
                right[owner[k]] += 1
    return [i for i, v in enumerate(recording.verses) if right[i] < 0.5 * len(normalize(v))]


def score_long(recording: Recording, out: FileOutput) -> dict[str, Any]:
    starts = [s for s, _, _ in out.segments]
    inside = all(0.0 <= s <= e <= recording.seconds + 0.02 for s, e, _ in out.segments)
    return {
        "wer": word_error_rate([recording.text], [out.text]),
        "first_segment_s": out.first_segment_s,
        "segments": len(out.segments),
        "monotone_inside": bool(out.segments) and inside and starts == sorted(starts),
        "lost_verses": lost_verses(recording, out.text),
        "text": out.text,
        "segment_times": [(s, e) for s, e, _ in out.segments],
    }


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """encdec's throughput over its peer's on the files, for the issue's two targets."""
    by = {r["run"]: r["files"]["audio_s_per_s"] for r in runs}
    pairs = {
        "greedy: encdec / faster_whisper_batched": ("encdec:1", "faster_whisper_batched:1"),
        "beam 5: encdec / faster_whisper": ("encdec:5", "faster_whisper:5"),
        "greedy: encdec / faster_whisper": ("encdec:1", "faster_whisper:1"),
    }
    return {k: by[a] / by[b] for k, (a, b) in pairs.items() if a in by and b in by}


def longform_table(results: dict[str, Any]) -> str:
    m, lg, fs = results["machine"], results["long"], results["files"]
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} cores. Long recording: {lg['seconds']:.1f} s, "
        f"{lg['verses']} verses; files: {fs['count']}, {fs['seconds']:.1f} s of audio.",
        "",
        "| run | long: audio s/s | long: WER | long: first segment s | segments | monotone, inside "
        "| verses lost | files: audio s/s | files: WER |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lo, fi = r["long"], r["files"]
        first = "-" if lo["first_segment_s"] is None else f"{lo['first_segment_s']:.1f}"
        mono = "-" if not lo["segments"] else ("yes" if lo["monotone_inside"] else "NO")
        lines.append(
            f"| {r['run']} | {lo['audio_s_per_s']:.1f} | {100 * lo['wer']:.1f}% | {first} | {lo['segments']} "
            f"| {mono} | {len(lo['lost_verses'])} | {fi['audio_s_per_s']:.1f} | {100 * fi['wer']:.1f}% |"
        )
    if results.get("ratios"):
        lines += ["", *(f"- {k}: {v:.2f}x" for k, v in results["ratios"].items())]
    return "\n".join(lines)
