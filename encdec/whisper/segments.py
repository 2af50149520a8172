"""Whisper's long-form rules on token sequences: segments, seeking, fallback and silence tests.

These are the rules of openai-whisper's ``transcribe`` (which faster-whisper follows), written as
pure functions of a window's generated tokens so that the driver (:mod:`encdec.whisper.longform`)
can apply them to many windows decoded at once:

- a window's tokens alternate timestamps and text, ``<|t0|> text <|t1|><|t1|> text <|t2|>``:
  two timestamps in a row close one segment and open the next; :func:`split_window` cuts them;
- a window whose last segment is unfinished (its tokens end in two timestamps, or in text) is
  resumed where its last finished segment ends: the next window *seeks* there and decodes the
  cut sentence whole, so none is lost at a window boundary; a window ending in a single
  timestamp is complete and the next one starts where the window's audio ends;
- a decode whose text compresses too well (gzip ratio above 2.4: repetition loops) or whose
  average log-probability is too low is retried at the next temperature (:func:`needs_fallback`),
  unless the window is silence (``<|nospeech|>`` likely and the text improbable: :func:`is_silent`).

Times: a timestamp token counts 20 ms from the window start; mel frames are 10 ms.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence

FRAMES_PER_SECOND = 100
"""Log-mel frames per second of audio (hop 160 at 16 kHz)."""
INPUT_STRIDE = 2
"""Mel frames per encoder position, and so per timestamp step."""
TIME_PRECISION = INPUT_STRIDE / FRAMES_PER_SECOND
"""Seconds per timestamp step (0.02)."""


@dataclasses.dataclass
class Segment:
    """A stretch of a file's transcript with its times (seconds from the start of the file)."""

    start: float
    end: float
    text: str
    tokens: list[int]
    """Its tokens, timestamps included."""
    avg_logprob: float | None = None
    """Average log-probability of its window's tokens (``<|endoftext|>`` included)."""
    compression_ratio: float | None = None
    """gzip compression ratio of its window's text."""
    no_speech_prob: float | None = None
    """Probability of ``<|nospeech|>`` after ``<|startoftranscript|>`` in its window (an upper
    bound, 0.5 or less, when it was not among the top log-probabilities)."""
    temperature: float = 0.0
    """Temperature of the decode it comes from (above 0 after a fallback)."""
    id: int = 0
    """Position in the file's segments, from 0."""


@dataclasses.dataclass(frozen=True)
class WindowSplit:
    """What one window's tokens say: its segments and how far the window's audio is consumed."""

    segments: list[tuple[float, float, list[int]]]
    """``(start, end, tokens)``, times in seconds from the window start."""
    seek_frames: int
    """Mel frames consumed: where the next window starts, from this one's start."""
    complete: bool
    """Whether the tokens ended with a finished segment (a single timestamp at the end)."""


def split_window(tokens: Sequence[int], timestamp_begin: int, content_frames: int) -> WindowSplit:
    """Cut a window's generated tokens (``<|endoftext|>`` excluded) into segments.

    ``content_frames``: mel frames of real audio in the window (at most 3,000); a window without
    a timestamp pair is one segment over all of it. Times past the audio are clipped to its end.
    """
    tokens = list(tokens)
    is_ts = [t >= timestamp_begin for t in tokens]
    content_s = content_frames / FRAMES_PER_SECOND
    single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
    pairs = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
    segments: list[tuple[float, float, list[int]]] = []
    if pairs:
        cuts = pairs + ([len(tokens)] if single_ending else [])
        last = 0
        for cut in cuts:
            piece = tokens[last:cut]
            segments.append((_time(piece[0], timestamp_begin), _time(piece[-1], timestamp_begin), piece))
            last = cut
        if single_ending:
            seek = content_frames
        else:  # the tokens after the last pair are an unfinished segment: decode it again
            seek = (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE
    else:
        stamps = [t for t in tokens if t >= timestamp_begin]
        end = content_s
        if stamps and stamps[-1] != timestamp_begin:
            end = _time(stamps[-1], timestamp_begin)
        segments.append((0.0, end, tokens))
        seek = content_frames
    if seek <= 0:  # no progress (only a broken timestamp sequence can say so): take the window
        seek = content_frames
    clipped = [
        (start, min(end, content_s), piece) for start, end, piece in segments if start < content_s
    ]
    return WindowSplit(clipped, min(seek, content_frames), single_ending or not pairs)


def _time(token: int, timestamp_begin: int) -> float:
    return (token - timestamp_begin) * TIME_PRECISION


def text_tokens(tokens: Sequence[int], eot: int) -> list[int]:
    """The text of a token sequence: every id below ``<|endoftext|>``."""
    return [t for t in tokens if t < eot]


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over gzip-compressed bytes: high for repetition loops (Whisper's 2.4 threshold)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def average_logprob(logprobs: Sequence[float], num_text_tokens: int) -> float:
    """openai-whisper's average: the tokens' log-probabilities (``<|endoftext|>``'s included)
    summed, over the text tokens plus one."""
    return float(sum(logprobs)) / (num_text_tokens + 1)


def no_speech_fields(sot_index: int, no_speech: int | None) -> dict[str, int]:
    """The request fields (:class:`~encdec.engine.Request`) under which the engine reports
    :func:`no_speech_prob`'s input: the prompt's log-probabilities from
    ``<|startoftranscript|>`` on (earlier positions prefilled at once), each holding
    ``<|nospeech|>``'s; none for a model without that token."""
    if no_speech is None:
        return {}
    return {"prompt_logprobs": 0, "prompt_logprobs_from": sot_index, "prompt_logprob_token_id": no_speech}


def no_speech_prob(
    prompt_logprobs: Sequence[Mapping[int, float]] | None, sot_index: int, no_speech: int | None
) -> float | None:
    """openai-whisper's ``no_speech_prob``: ``<|nospeech|>``'s probability after
    ``<|startoftranscript|>``, from a request's prompt log-probabilities (entry ``i`` predicts
    prefix token ``i + 1``) asked for with :func:`no_speech_fields`; None without them.
    openai-whisper takes it before suppressing tokens, the engine after the front end's static
    suppression (``<|nospeech|>`` itself is spared): the suppressed tokens' share of the
    distribution there is the difference (1e-6 to 5e-5 of the value on Whisper-base, speech or
    silence, against CTranslate2's)."""
    if no_speech is None or not prompt_logprobs or sot_index >= len(prompt_logprobs):
        return None
    lp = prompt_logprobs[sot_index].get(no_speech)
    return None if lp is None else math.exp(lp)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a window's decode is retried or skipped (openai-whisper's defaults)."""

    compression_ratio: float | None = 2.4
    """Retry above this gzip ratio (repetition); None: never."""
    logprob: float | None = -1.0
    """Retry below this average log-probability; None: never."""
    no_speech: float | None = 0.6
    """A window is silent above this ``<|nospeech|>`` probability when its text is also
    improbable (average log-probability below ``logprob``); None: never."""


def is_silent(no_speech_prob: float | None, avg_logprob: float | None, th: Thresholds) -> bool:
    """openai-whisper's skip test: ``<|nospeech|>`` likely, and the text not confidently decoded."""
    if th.no_speech is None or no_speech_prob is None or no_speech_prob <= th.no_speech:
        return False
    return not (th.logprob is not None and avg_logprob is not None and avg_logprob > th.logprob)


def needs_fallback(
    ratio: float, avg_logprob: float | None, no_speech_prob: float | None, th: Thresholds
) -> bool:
    """Whether to decode the window again at the next temperature."""
    failed = th.compression_ratio is not None and ratio > th.compression_ratio
    if th.logprob is not None and avg_logprob is not None and avg_logprob < th.logprob:
        failed = True
    silent = (
        th.no_speech is not None
        and no_speech_prob is not None
        and no_speech_prob > th.no_speech
        and th.logprob is not None
        and avg_logprob is not None
        and avg_logprob < th.logprob
    )
    return failed and not silent


def previous_text_prompt(tokens: Sequence[int], max_tokens: int) -> list[int]:
    """The last ``max_tokens`` of the text so far, for a ``<|startofprev|>`` prompt."""
    return list(tokens[-max_tokens:]) if max_tokens > 0 else []


@dataclasses.dataclass
class Transcription:
    """One file's long-form transcription (``encdec.whisper.longform``)."""

    source: str
    """The file's path, or ``audio[i]`` for an array."""
    segments: list[Segment] = dataclasses.field(default_factory=list)
    language: str | None = None
    language_probs: dict[str, float] | None = None
    """Detected languages' probabilities, most likely first (None when the language was given)."""
    duration: float = 0.0
    """Seconds of audio."""
    error: str | None = None
    """Why the file was not transcribed (unreadable, empty, silent, ...); no segments then."""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds from the start of the call: ``first_segment`` (the file's earliest segment known)
    and ``done``."""
    windows: int = 0
    """Decodes run for it (30 s windows, fallbacks and detection included)."""

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text).strip()
