"""Transcription response formats: one list of timed segments rendered as OpenAI's ``json``,
``text``, ``srt``, ``vtt`` or ``verbose_json``.

Whoever produces the segments (30 s windows today, timestamped long-form segments later) only
builds :class:`Segment` s; every format is rendered from them here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from encdec.whisper.language import language_name
from encdec.whisper.segments import compression_ratio

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "vtt", "verbose_json")

MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


@dataclasses.dataclass(frozen=True)
class Segment:
    """A stretch of audio and its text; times in seconds from the start of the file."""

    start: float
    end: float
    text: str
    token_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    """The sampling temperature the segment was decoded with."""
    avg_logprob: float | None = None
    """Whisper's figure: the sum of the tokens' log-probabilities (``<|endoftext|>``'s included)
    over the text tokens plus one."""
    no_speech_prob: float | None = None
    """``<|nospeech|>``'s probability after ``<|startoftranscript|>``."""


def joined_text(segments: Sequence[Segment]) -> str:
    """The transcript: the segments' texts, stripped, joined by single spaces."""
    return " ".join(t for t in (s.text.strip() for s in segments) if t)


def timestamp(seconds: float, *, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (SRT, ``decimal=","``) or ``HH:MM:SS.mmm`` (WebVTT), rounded to the ms."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _cues(segments: Sequence[Segment]) -> list[Segment]:
    """Segments with text (a cue without text is not written)."""
    return [s for s in segments if s.text.strip()]


def to_srt(segments: Sequence[Segment]) -> str:
    blocks = [
        f"{i}\n{timestamp(s.start, decimal=',')} --> {timestamp(s.end, decimal=',')}\n{s.text.strip()}\n"
        for i, s in enumerate(_cues(segments), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: Sequence[Segment]) -> str:
    blocks = [
        f"{timestamp(s.start, decimal='.')} --> {timestamp(s.end, decimal='.')}\n{s.text.strip()}\n"
        for s in _cues(segments)
    ]
    return "\n".join(["WEBVTT\n", *blocks])


def verbose_json(segments: Sequence[Segment], *, task: str, language: str, duration: float) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: the language by name, as OpenAI's API gives it (the audio's for a
    transcription, ``english`` for a translation: its output's), the text, the duration and every
    segment with its times, tokens, ``avg_logprob`` and ``no_speech_prob`` (each where known)."""
    return {
        "task": task,
        "language": language_name("en" if task == "translate" else language),
        "duration": round(duration, 3),
        "text": joined_text(segments),
        "segments": [
            {
                "id": i,
                "seek": round(s.start * 100),  # in 10 ms frames, as Whisper counts
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": list(s.token_ids),
                "temperature": s.temperature,
                "compression_ratio": compression_ratio(s.text),
                **({} if s.avg_logprob is None else {"avg_logprob": s.avg_logprob}),
                **({} if s.no_speech_prob is None else {"no_speech_prob": s.no_speech_prob}),
            }
            for i, s in enumerate(segments)
        ],
    }


def render(
    response_format: str, segments: Sequence[Segment], *, task: str, language: str, duration: float
) -> tuple[str | dict[str, Any], str]:
    """The response body (a string, or a dict to send as JSON) and its media type."""
    if response_format == "json":
        body: str | dict[str, Any] = {"text": joined_text(segments)}
    elif response_format == "verbose_json":
        body = verbose_json(segments, task=task, language=language, duration=duration)
    elif response_format == "text":
        body = joined_text(segments) + "\n"
    elif response_format == "srt":
        body = to_srt(segments)
    elif response_format == "vtt":
        body = to_vtt(segments)
    else:
        raise ValueError(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}"
        )
    return body, MEDIA_TYPES[response_format]
