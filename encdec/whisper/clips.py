"""Evaluation clips: sentences the project keeps, spoken by espeak-ng, and word error rate.

espeak-ng is a Debian package (``apt-get install espeak-ng``); clips are cached by the hash of
their text, voice and speed, so re-runs synthesize nothing.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path


class SynthesisError(RuntimeError):
    """espeak-ng is missing or failed."""


def load_sentences(path: str | Path | None = None) -> list[str]:
    """Non-empty lines of ``path`` (default: ``encdec/whisper/sentences.txt``)."""
    text = (
        Path(path).read_text()
        if path
        else resources.files("encdec.whisper").joinpath("sentences.txt").read_text()
    )
    return [line.strip() for line in text.splitlines() if line.strip()]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(
    sentences: Sequence[str], out_dir: str | Path, *, voice: str = "en-us", speed: int = 160
) -> list[Path]:
    """One WAV per sentence (espeak-ng's 22,050 Hz 16-bit mono), reusing cached clips."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisError("espeak-ng is not installed (Debian/Ubuntu: apt-get install -y espeak-ng)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sentence in sentences:
        key = hashlib.sha256(f"{voice}|{speed}|{sentence}".encode()).hexdigest()[:16]
        path = out_dir / f"{key}.wav"
        if not path.exists():
            tmp = path.with_suffix(".tmp.wav")
            try:
                subprocess.run(
                    [exe, "-v", voice, "-s", str(speed), "-w", str(tmp), "--", sentence],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                raise SynthesisError(f"espeak-ng failed on {sentence!r}: {getattr(e, 'stderr', e)}") from e
            tmp.replace(path)
        paths.append(path)
    return paths


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes inside words kept; hyphens split words)."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^\w' ]+", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Word-level edit distance (substitutions + insertions + deletions) and the reference length."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: total edits over total reference words."""
    pairs = [word_errors(r, h) for r, h in zip(references, hypotheses, strict=True)]
    words = sum(n for _, n in pairs)
    return sum(e for e, _ in pairs) / max(words, 1)
