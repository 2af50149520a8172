"""The Whisper experiment: encdec vs CTranslate2 on the same weights, features and espeak-ng clips.

Systems: ``encdec`` (the in-flight batching engine with ``batch_size`` decode slots: encoder
batches, paged cross K/V, Whisper's prompt as a forced prefix), ``encdec_dense``
(:func:`~encdec.whisper.transcribe`, the dense-cache reference; optional) and ``ctranslate2``.

Measures throughput (audio seconds per wall second, all clips submitted at once; best of
``repeats``), the process CPU seconds per audio second of that run (steadier than wall time on
shared cores), latency (one clip at a time, median; the engine keeps its ``batch_size`` slots,
so a lone clip pays for a full-width decode step), word error rate against the sentences, and
whether encdec's and CTranslate2's greedy tokens agree. Timed runs of the systems are
interleaved. All systems are timed from WAV files to text and share encdec's log-mel front
end, so the comparison is of the models' runtimes. Writes ``results.json``, ``results.md`` and
``results.png`` (:mod:`encdec.bench.results`). Run it with ``encdec run experiments/whisper_base.yaml``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encdec.bench.ctranslate2 import CT2Whisper
from encdec.bench.machine import machine_info
from encdec.bench.results import write_results
from encdec.experiment_config import ConfigError, build, read_yaml
from encdec.whisper.audio import features_for
from encdec.whisper.clips import load_sentences, synthesize, wer
from encdec.whisper.serving import transcribe_with_engine, whisper_engine
from encdec.whisper.transcribe import load_whisper, transcribe

SYSTEMS = ("encdec", "encdec_dense", "ctranslate2")


@dataclasses.dataclass(frozen=True)
class WhisperExperimentConfig:
    name: str = "whisper_base"
    """Names the default output folder ``results/<name>``."""
    model: str | None = None
    """HF or CTranslate2 Whisper directory; ``None`` fetches Whisper-base into the cache."""
    sentences: str | None = None
    """Sentence file (default ``encdec/whisper/sentences.txt``); the first ``num_clips`` are spoken."""
    num_clips: int = 16
    voice: str = "en-us"
    """espeak-ng voice."""
    speed: int = 160
    """espeak-ng words per minute."""
    language: str = "en"
    batch_size: int = 16
    """Clips per batch in the throughput runs (CTranslate2, encdec_dense); the engine's decode slots."""
    encoder_batch: int = 4
    """encdec: windows per encoder call (bounds the encoder's attention memory)."""
    steps_per_dispatch: int = 4
    """encdec engine: decode steps per jitted call."""
    repeats: int = 2
    """Timed throughput runs per system (after one warm-up run); the best is reported."""
    latency_clips: int = 4
    """Clips transcribed one at a time for the latency figure (median)."""
    ct2_threads: int = 2
    """CTranslate2 ``intra_threads`` (match the cores JAX uses)."""
    ct2_compute_type: str = "float32"
    quantize: str | None = None
    """encdec's weights: ``int8`` for int8 weights (:func:`encdec.load_pretrained`); set
    ``ct2_compute_type: int8`` beside it for CTranslate2's int8 on the same file."""
    systems: tuple[str, ...] = ("encdec", "ctranslate2")
    """Any of ``encdec`` (the engine), ``encdec_dense`` (``transcribe``) and ``ctranslate2``."""

    def __post_init__(self):
        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown:
            raise ValueError(f"systems: unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> WhisperExperimentConfig:
        """Read an experiment YAML file (``kind: whisper``) and apply ``--set`` overrides."""
        raw = read_yaml(path)
        kind = raw.pop("kind", "whisper")
        if kind != "whisper":
            raise ConfigError("kind", f"{path} is not a whisper experiment (kind: {kind!r})")
        return build(cls, raw, overrides)


def _timed(fn, *args) -> tuple[Any, tuple[float, float]]:
    """The result, and the wall and process CPU (all threads) seconds it took."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, (time.perf_counter() - start, time.process_time() - cpu)


def run_whisper_experiment(cfg: WhisperExperimentConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run every system of ``cfg`` on the clips; write and return the results (see the module doc)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = load_sentences(cfg.sentences)[: cfg.num_clips]
    if len(sentences) < cfg.num_clips:
        raise ValueError(f"only {len(sentences)} sentences for num_clips={cfg.num_clips}")
    paths = synthesize(sentences, out_dir / "clips", voice=cfg.voice, speed=cfg.speed)
    model = load_whisper(cfg.model, quantize=cfg.quantize)
    audio_seconds = sum(features_for(p)[1] for p in paths)

    runners = {}
    if "encdec" in cfg.systems:
        engine = whisper_engine(
            model,
            num_slots=cfg.batch_size,
            encoder_batch=cfg.encoder_batch,
            steps_per_dispatch=cfg.steps_per_dispatch,
        )
        engine.warmup()
        runners["encdec"] = lambda batch: [
            (r.token_ids, r.text) for r in transcribe_with_engine(engine, batch, language=cfg.language)
        ]
    if "encdec_dense" in cfg.systems:
        dense = dict(language=cfg.language, batch_size=cfg.batch_size, encoder_batch=cfg.encoder_batch)
        runners["encdec_dense"] = lambda batch: [
            (r.token_ids, r.text) for r in transcribe(model, batch, **dense)
        ]
    if "ctranslate2" in cfg.systems:
        peer = CT2Whisper(
            model.path, compute_type=cfg.ct2_compute_type, threads=cfg.ct2_threads, language=cfg.language,
            model=model,
        )
        runners["ctranslate2"] = lambda batch: [
            x for i in range(0, len(batch), cfg.batch_size) for x in peer(batch[i : i + cfg.batch_size])
        ]
    outputs = {name: runners[name](paths) for name in cfg.systems}  # warm-up: compiles encdec's steps
    for name in cfg.systems:
        runners[name](paths[:1])  # and its batch-1 steps
    # Interleaved, so a noisy machine (shared cores) burdens both systems alike.
    batch = {name: [] for name in cfg.systems}
    latency = {name: [] for name in cfg.systems}
    for _ in range(cfg.repeats):
        for name in cfg.systems:
            batch[name].append(_timed(runners[name], paths)[1])
    for path in paths[: cfg.latency_clips]:
        for name in cfg.systems:
            latency[name].append(_timed(runners[name], [path])[1][0])
    systems: dict[str, dict[str, Any]] = {}
    for name in cfg.systems:
        texts = [text for _, text in outputs[name]]
        best = min(batch[name], key=lambda t: t[0])
        systems[name] = {
            "throughput_audio_s_per_s": audio_seconds / best[0],
            "batch_seconds": [t[0] for t in batch[name]],
            "batch_cpu_seconds": [t[1] for t in batch[name]],
            "cpu_s_per_audio_s": best[1] / audio_seconds,
            "latency_median_s": statistics.median(latency[name]),
            "latency_seconds": latency[name],
            "wer": wer(sentences, texts),
            "texts": texts,
            "token_ids": [ids for ids, _ in outputs[name]],
        }
    results = {
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(),
        "clips": len(paths),
        "audio_seconds": audio_seconds,
        "sentences": sentences,
        "systems": systems,
    }
    if {"encdec", "ctranslate2"} <= set(systems):
        pairs = zip(systems["encdec"]["token_ids"], systems["ctranslate2"]["token_ids"], strict=True)
        results["clips_with_identical_tokens"] = sum(a == b for a, b in pairs)
    write_results(results, out_dir, markdown=whisper_table(results), plots=plot_whisper_results)
    return results


def whisper_table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['clips']} clips, {results['audio_seconds']:.1f} s of audio; "
        f"machine: {results['machine']['cpu']}, {results['machine']['usable_cores']} cores",
        "",
        "| system | throughput (audio s / s) | batch (s) | CPU s per audio s | latency, 1 clip (s) | WER |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in results["systems"].items():
        lines.append(
            f"| {name} | {s['throughput_audio_s_per_s']:.2f} | {min(s['batch_seconds']):.2f} | "
            f"{s['cpu_s_per_audio_s']:.2f} | {s['latency_median_s']:.2f} | {100 * s['wer']:.1f}% |"
        )
    if "clips_with_identical_tokens" in results:
        lines += [
            "",
            f"Greedy tokens identical on {results['clips_with_identical_tokens']}/{results['clips']} clips.",
        ]
    return "\n".join(lines)


def plot_whisper_results(results: dict[str, Any], out_dir: Path) -> None:
    """``results.png``: throughput, one-clip latency and WER per system."""
    # Figure objects, not pyplot: a notebook's inline backend is left alone.
    from matplotlib.figure import Figure

    names = list(results["systems"])
    metrics = [
        ("throughput_audio_s_per_s", "throughput (audio s / s)", 1.0),
        ("latency_median_s", "latency, one clip (s)", 1.0),
        ("wer", "word error rate (%)", 100.0),
    ]
    fig = Figure(figsize=(4 * len(metrics), 3.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (key, label, scale) in zip(axes, metrics, strict=True):
        ax.bar(
            names,
            [scale * results["systems"][n][key] for n in names],
            color=["tab:blue", "tab:orange", "tab:green"][: len(names)],
        )
        ax.set_title(label)
    fig.suptitle(f"Whisper on {results['clips']} espeak-ng clips ({results['audio_seconds']:.0f} s of audio)")
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=120)
