"""Transcripts out: SubRip (``.srt``), WebVTT (``.vtt``), plain text and JSON.

Text files hold one line per segment. SRT and VTT cues are the segments, one cue each, times to
the millisecond (``00:01:02,345`` / ``00:01:02.345``); cue text never holds a blank line or
``-->`` (either would end the cue for a player). JSON holds everything: the segments with their
times, text, tokens, average log-probability, compression ratio, no-speech probability and
temperature, and the language.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from encdec.whisper.segments import Segment, Transcription

FORMATS = ("txt", "srt", "vtt", "json")


def timestamp(seconds: float, decimal: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT) or, with ``decimal="."``, ``HH:MM:SS.mmm`` (WebVTT)."""
    ms = max(0, int(round(seconds * 1000)))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _cue_text(text: str) -> str:
    lines = [line.strip() for line in text.replace("-->", "->").splitlines()]
    return "\n".join(line for line in lines if line)


def _cues(t: Transcription) -> list[Segment]:
    return [s for s in t.segments if _cue_text(s.text)]


def to_srt(t: Transcription) -> str:
    blocks = [
        f"{i}\n{timestamp(s.start)} --> {timestamp(s.end)}\n{_cue_text(s.text)}\n"
        for i, s in enumerate(_cues(t), 1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcription) -> str:
    blocks = [
        f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{_cue_text(s.text)}\n" for s in _cues(t)
    ]
    return "\n".join(["WEBVTT\n", *blocks])


def to_txt(t: Transcription) -> str:
    """One line per segment."""
    return "".join(f"{' '.join(s.text.split())}\n" for s in t.segments if s.text.strip())


def to_json(t: Transcription) -> str:
    return json.dumps(
        {
            "source": t.source,
            "language": t.language,
            "language_probs": t.language_probs,
            "duration": t.duration,
            "text": t.text,
            "segments": [dataclasses.asdict(s) for s in t.segments],
        },
        indent=2,
        ensure_ascii=False,
    )


WRITERS: dict[str, Callable[[Transcription], str]] = {
    "txt": to_txt,
    "srt": to_srt,
    "vtt": to_vtt,
    "json": to_json,
}


def write_transcription(t: Transcription, out_dir: str | Path, fmt: str, *, name: str | None = None) -> Path:
    """Write ``t`` as ``out_dir/<name>.<fmt>`` (``name``: the source's name without its extension);
    ``out_dir`` must exist. Returns the file's path."""
    if fmt not in WRITERS:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(FORMATS)}")
    path = Path(out_dir) / f"{name or Path(t.source).stem or 'audio'}.{fmt}"
    path.write_text(WRITERS[fmt](t), encoding="utf-8")
    return path


def check_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and prove it writable (a clear ``OSError`` subclass otherwise),
    before any audio is transcribed."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".encdec-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"cannot write to output directory {out}: {e.strerror or e}") from None
    return out


class OutputDirError(OSError):
    """The output directory cannot be created or written."""
