"""Long recordings for the long-form benchmark: the King James Bible read by espeak-ng.

The text is the King James Version (1611), public domain; Debian packages it as
``bible-kjv-text`` and its ``bible`` program (package ``bible-kjv``, GPL-2+) prints verses
(``apt-get install bible-kjv espeak-ng``). Narrative chapters are read verse after verse, each
verse synthesized once (cached by :func:`encdec.whisper.clips.synthesize`), resampled to 16 kHz
and joined with a short pause, until a recording reaches its length. Recordings are cached (by
a hash of their verses, voice, speed and pause) outside the repository; each keeps its text and
every verse's time span, so a benchmark can tell which verses a transcript lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encdec.whisper.audio import SAMPLE_RATE, load_audio
from encdec.whisper.clips import SynthesisError, synthesize

PASSAGES = (
    "Jonah1:1-17", "Jonah2:1-10", "Jonah3:1-10", "Jonah4:1-11", "Ruth1:1-22", "Ruth2:1-23",
    "Ruth3:1-18", "Ruth4:1-22", "Luke15:1-32", "Genesis37:1-36", "Acts27:1-44", "Mark4:1-41",
    "Daniel6:1-28", "Esther2:1-23", "Judges16:4-31", "John9:1-41", "2Kings5:1-27", "Acts9:1-31",
    "Exodus2:1-25", "Luke10:25-42", "Matthew14:13-36", "Genesis24:1-67", "Mark5:1-43",
    "Numbers22:21-35",
)
"""Narrative chapters, read in this order. None repeats itself much: the gzip compression ratio
of every 80-word stretch stays under 2 (Whisper retries a window above 2.4; the formulaic
chapters, such as Genesis 1, reach 2.3 in the text alone)."""

_VERSE = re.compile(r"^\S+?\d+:\d+\s+(.*)$")


@dataclasses.dataclass(frozen=True)
class Recording:
    path: Path
    """16 kHz 16-bit mono WAV."""
    verses: tuple[str, ...]
    spans: tuple[tuple[float, float], ...]
    """Each verse's start and end in seconds."""

    @property
    def text(self) -> str:
        return " ".join(self.verses)

    @property
    def seconds(self) -> float:
        return self.spans[-1][1] if self.spans else 0.0


def kjv_verses(passages: Sequence[str] = PASSAGES) -> list[str]:
    """The verses of ``passages`` (``Book<chapter>:<first>-<last>``), through Debian's ``bible``."""
    exe = shutil.which("bible")
    if exe is None:
        raise SynthesisError("the `bible` program is not installed (Debian: apt-get install -y bible-kjv)")
    try:
        out = subprocess.run([exe, "-f", *passages], check=True, capture_output=True, text=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise SynthesisError(f"`bible` failed: {getattr(e, 'stderr', e)}") from e
    verses = []
    for line in out.stdout.splitlines():
        m = _VERSE.match(line.strip())
        if m:
            verses.append(m.group(1).strip())
        elif line.strip() and verses:  # a wrapped line continues its verse
            verses[-1] += " " + line.strip()
    return verses


def long_recordings(
    durations: Sequence[float],
    out_dir: str | Path,
    *,
    first_verse: int = 0,
    voice: str = "en-us",
    speed: int = 160,
    pause: float = 0.4,
    verses: Sequence[str] | None = None,
) -> list[Recording]:
    """One recording per duration (seconds, each at least that long), consecutive verses from
    ``first_verse`` on; verse clips in ``out_dir/verses``, recordings in ``out_dir``."""
    out_dir = Path(out_dir)
    verses = list(verses) if verses is not None else kjv_verses()
    gap = np.zeros(int(pause * SAMPLE_RATE), np.float32)
    recordings, v = [], first_verse
    for target in durations:
        chosen: list[str] = []
        clips: list[np.ndarray] = []
        seconds = 0.0
        while seconds < target:
            if v >= len(verses):
                raise ValueError(f"{len(verses)} verses are not enough for {list(durations)} s")
            (path,) = synthesize([verses[v]], out_dir / "verses", voice=voice, speed=speed)
            clips.append(load_audio(path))
            chosen.append(verses[v])
            seconds += (len(clips[-1]) + len(gap)) / SAMPLE_RATE
            v += 1
        recordings.append(_assemble(out_dir, chosen, clips, gap, voice, speed))
    return recordings


def _assemble(out_dir, verses, clips, gap, voice, speed) -> Recording:
    key = hashlib.sha256(json.dumps([verses, voice, speed, len(gap)]).encode()).hexdigest()[:16]
    path = out_dir / f"kjv-{key}.wav"
    spans, t = [], 0
    for clip in clips:
        spans.append((t / SAMPLE_RATE, (t + len(clip)) / SAMPLE_RATE))
        t += len(clip) + len(gap)
    if not path.exists():
        audio = np.concatenate([x for clip in clips for x in (clip, gap)][:-1])
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
        tmp = path.with_suffix(".tmp.wav")
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(SAMPLE_RATE)
            f.writeframes(pcm.tobytes())
        tmp.replace(path)
    return Recording(path, tuple(verses), tuple(spans))
