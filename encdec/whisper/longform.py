"""Long-form transcription through the engine: many files, many chunks, one batch of decode slots.

openai-whisper (and faster-whisper's sequential mode) walk a file one 30 s window at a time:
decode a window with timestamps, keep its finished segments, seek to the end of the last one,
repeat. This driver runs that loop for many *streams* at once and lets the engine batch their
windows:

- each file is cut at silences into chunks (:mod:`encdec.whisper.silence`), each chunk is one
  stream whose windows seek one after another (:mod:`encdec.whisper.segments`); with
  ``vad=False`` the whole file is one stream, exactly openai-whisper's walk;
- every stream with no window in flight submits its next one; the engine decodes up to
  ``num_slots`` windows together (beams: ``beam_size`` slots each), so the parallelism comes
  from many files and many chunks, never from guessing ahead inside a stream;
- a window whose text is repetitive or improbable is decoded again at the next temperature
  (``best_of`` samples), a silent one is skipped; ``condition_on_previous_text`` prompts a
  window with the text its stream decoded before (``<|startofprev|>``), chunks start afresh;
- a window's fallback temperatures are tried in turn, as openai-whisper tries them, while other
  windows wait to be decoded; when nothing else waits, the later temperatures are decoded
  beside the current one (slots would idle otherwise) and the first that passes, in order, is
  kept, the rest cancelled. Each attempt's samples depend on its window and temperature only,
  so the result is the same either way;
- with ``language=None`` each file's language is detected first from its first 30 s of speech:
  one step restricted to language tokens (:mod:`encdec.whisper.rules`), top log-probabilities
  returned.

A file that cannot be read, is empty or is silent gets a :class:`Transcription` with its
``error``; the other files are transcribed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encdec.engine import Engine, Request, RequestError, RequestOutput
from encdec.whisper.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE, AudioError, load_audio
from encdec.whisper.frontend import AudioInput, WhisperFrontEnd
from encdec.whisper.language import detection_request, language_probs
from encdec.whisper.options import LongFormOptions
from encdec.whisper.segments import (
    FRAMES_PER_SECOND,
    Segment,
    Transcription,
    average_logprob,
    compression_ratio,
    is_silent,
    needs_fallback,
    no_speech_fields,
    no_speech_prob,
    split_window,
    text_tokens,
)
from encdec.whisper.silence import FRAME, Chunk, plan_chunks, speech_frames, speech_regions

WINDOW_FRAMES = N_SAMPLES // HOP_LENGTH


@dataclasses.dataclass
class _Attempt:
    temperature: float
    tokens: list[int]
    """Generated tokens, ``<|endoftext|>`` excluded."""
    avg_logprob: float | None
    ratio: float
    no_speech_prob: float | None


@dataclasses.dataclass
class _File:
    index: int
    source: str
    result: Transcription
    samples: np.ndarray | None = None
    speech: np.ndarray | None = None
    """Speech per 20 ms frame (vad only)."""
    streams: list[_Stream] = dataclasses.field(default_factory=list)
    streams_left: int = 0
    """Streams with windows still to decode."""
    in_flight: int = 0
    """Its requests in the engine."""


@dataclasses.dataclass
class _Stream:
    file: _File
    number: int
    start: int
    """First sample of the chunk in the file."""
    samples: np.ndarray
    seek: int = 0
    """Mel frames of the chunk already transcribed."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    prompt_from: int = 0
    tried: dict[int, _Attempt] = dataclasses.field(default_factory=dict)
    """The current window's decodes, by temperature index."""
    asked: dict[int, int] = dataclasses.field(default_factory=dict)
    """Temperature index -> engine handle of the current window's decodes in flight."""
    segments: list[Segment] = dataclasses.field(default_factory=list)
    sot_index: int = 0
    """Where ``<|startoftranscript|>`` is in the prompt of the window in flight."""

    @property
    def frames(self) -> int:
        return len(self.samples) // HOP_LENGTH


class LongFormTranscriber:
    """Transcribe files through a Whisper engine (:func:`encdec.whisper.longform_engine` sizes one
    for the options); see the module doc."""

    def __init__(self, engine: Engine, options: LongFormOptions | None = None):
        options = options or LongFormOptions()
        if not isinstance(engine.frontend, WhisperFrontEnd):
            raise ValueError("the engine has no Whisper front end (build it with longform_engine)")
        tokens = engine.frontend.tokens
        if options.language is not None:
            tokens.check_language(options.language)
        tokens.prompt("en", options.task)  # an unknown task fails here, before any audio is read
        if options.timestamps and tokens.timestamp_begin is None:
            raise ValueError("this model has no timestamp tokens: use timestamps=False")
        positions = engine.model.config.max_positions
        need = options.prefix_len(positions)
        if need > engine.max_prefix:
            raise ValueError(
                f"prompts of up to {need} tokens need EngineConfig.max_decoder_prefix >= {need}, "
                f"the engine has {engine.max_prefix} (build it with longform_engine)"
            )
        self.engine, self.options, self.tokens = engine, options, tokens
        self.prompt_tokens = options.prompt_tokens(positions)
        self.initial_prompt: tuple[int, ...] = ()
        """The initial prompt's ids, each stream's first previous text."""
        if options.initial_prompt is not None:
            self.initial_prompt = tokens.encode_prompt(
                engine.model.tokenizer, options.initial_prompt, engine.model.config.vocab_size
            )
        self.max_in_flight = 2 * engine.config.num_slots
        self.speculative_decodes = 0
        """Fallback decodes started before the temperatures before them had failed (so far)."""
        self._speculate = True

    # ---- the loop -----------------------------------------------------------------------------

    def transcribe(
        self,
        audio: Sequence[str | Path | np.ndarray],
        *,
        on_done: Callable[[Transcription], None] | None = None,
    ) -> list[Transcription]:
        """Transcriptions of ``audio`` (paths, or 16 kHz arrays), in order; ``on_done`` is called
        with each as soon as it is complete (files finish in any order)."""
        self._start = time.perf_counter()
        files = [
            _File(i, _name(a, i), Transcription(_name(a, i))) for i, a in enumerate(audio)
        ]
        unopened = collections.deque(zip(files, audio, strict=True))
        # Next work: a file's language detection, or a stream's window at a temperature index.
        ready: collections.deque[_File | tuple[_Stream, int]] = collections.deque()
        pending: dict[int, tuple[_File | _Stream, int]] = {}
        done = 0

        def finish(f: _File) -> None:
            nonlocal done
            f.samples = f.speech = None
            f.result.timings["done"] = time.perf_counter() - self._start
            done += 1
            if on_done is not None:
                on_done(f.result)

        def submit(item: _File | tuple[_Stream, int]) -> None:
            f = item if isinstance(item, _File) else item[0].file
            if f.result.error is not None:
                return  # a failed file's other windows are not decoded
            try:
                if isinstance(item, _File):
                    handle, pending_item = self.engine.submit(self._detect_request(f)), (f, 0)
                else:
                    st, index = item
                    handle = self.engine.submit(self._window_request(st, index))
                    st.asked[index], pending_item = handle, (st, index)
            except RequestError as e:
                f.result.error = f"a window could not be decoded: {e}"
                if f.in_flight == 0:
                    finish(f)
                return
            pending[handle] = pending_item
            f.in_flight += 1
            f.result.windows += 1

        def drop(st: _Stream) -> None:
            """Cancel a window's decodes still in flight (a decode before them was kept)."""
            for handle in st.asked.values():
                self.engine.cancel(handle)
                self.engine.result(handle)
                del pending[handle]
                st.file.in_flight -= 1
            st.asked.clear()

        while done < len(files):
            while len(pending) < self.max_in_flight and (ready or unopened):
                if not ready:
                    f, a = unopened.popleft()
                    if not self._open(f, a, ready):
                        finish(f)
                    continue
                submit(ready.popleft())
            # Nothing else waits: decode the next fallback temperatures beside the current one
            # (a stream with decodes tried and none kept is at a fallback temperature).
            if self._speculate and not ready and not unopened:
                for st in (st for f in files if f.result.error is None for st in f.streams if st.tried):
                    later = self._next_untried(st)
                    if later is not None and len(pending) < self.max_in_flight:
                        submit((st, later))
                        self.speculative_decodes += 1
            self.engine.step()
            for handle in list(pending):
                if handle not in pending:
                    continue  # cancelled by drop() in this loop
                out = self.engine.result(handle)
                if out is None:
                    continue
                item, index = pending.pop(handle)
                f = item if isinstance(item, _File) else item.file
                f.in_flight -= 1
                if isinstance(item, _Stream):
                    item.asked.pop(index, None)
                if f.result.error is None:
                    if out.finish_reason == "error":
                        f.result.error = f"a window could not be decoded: {out.error}"
                    elif item is f:
                        self._detected(f, out)
                        ready.extend((st, 0) for st in f.streams)
                    else:
                        st = item
                        st.tried[index] = self._attempt(st, index, out)
                        chosen = self._decide(st)
                        if chosen is None:  # another temperature is needed
                            nxt = self._next_needed(st)
                            if nxt is not None:
                                ready.appendleft((st, nxt))
                        else:
                            drop(st)
                            if self._window_done(st, chosen):
                                ready.append((st, 0))
                            else:
                                f.streams_left -= 1
                if f.result.error is not None:
                    for st in f.streams:
                        drop(st)
                if f.in_flight == 0 and (f.result.error is not None or f.streams_left == 0):
                    self._collect(f)
                    finish(f)
        return [f.result for f in files]

    # ---- files --------------------------------------------------------------------------------

    def _open(self, f: _File, source: Any, ready: collections.deque) -> bool:
        """Read and chunk a file; queue its detection or its streams. False: it failed."""
        try:
            samples = load_audio(source)
        except (AudioError, ValueError) as e:
            f.result.error = str(e)
            return False
        f.result.duration = len(samples) / SAMPLE_RATE
        opts = self.options
        if opts.vad:
            regions = speech_regions(samples, opts.silence)
            chunks = plan_chunks(regions, len(samples), opts.silence)
            f.speech = speech_frames(samples, opts.silence)
        else:
            chunks = [Chunk(0, len(samples))] if np.any(samples) else []
        if not chunks:
            f.result.error = f"{f.source} is silent: no speech found in {f.result.duration:.1f} s of audio"
            return False
        f.samples = samples
        f.streams = [
            _Stream(f, i, c.start, samples[c.start : c.end], tokens=list(self.initial_prompt))
            for i, c in enumerate(chunks)
        ]
        f.streams_left = len(f.streams)
        f.result.language = opts.language if self.tokens.languages else "en"
        if opts.language is None and self.tokens.languages:
            ready.append(f)  # its language first
        else:
            ready.extend((st, 0) for st in f.streams)
        return True

    def _detect_request(self, f: _File) -> Request:
        start = f.streams[0].start  # the first 30 s of speech
        top = min(5, self.engine.config.max_logprobs)
        request = detection_request(self.tokens, f.samples[start : start + N_SAMPLES], top)
        return dataclasses.replace(request, adapter_id=self.options.adapter)

    def _detected(self, f: _File, out: RequestOutput) -> None:
        f.result.language = self.tokens.language_of(out.token_ids[0])
        f.result.language_probs = language_probs(self.tokens, out)

    def _collect(self, f: _File) -> None:
        if f.result.error is not None:
            return
        segments = sorted((s for st in f.streams for s in st.segments), key=lambda s: (s.start, s.end))
        for i, s in enumerate(segments):
            s.id = i
        f.result.segments = segments

    # ---- windows ------------------------------------------------------------------------------

    def _window_request(self, st: _Stream, index: int) -> Request:
        """The stream's current window at temperature ``opts.temperatures[index]``."""
        opts, tokens = self.options, self.tokens
        f = st.file
        t = opts.temperatures[index]
        previous = st.tokens[st.prompt_from :][-self.prompt_tokens :] if self.prompt_tokens else []
        prefix = tokens.prompt(f.result.language, opts.task, timestamps=opts.timestamps, previous=previous)
        st.sot_index = 1 + len(previous) if previous else 0  # not searched: prompt ids may hold one
        window = st.samples[st.seek * HOP_LENGTH : st.seek * HOP_LENGTH + N_SAMPLES]
        th = opts.thresholds
        kw: dict[str, Any] = {}
        if th.logprob is not None or t > 0:
            kw["logprobs"] = 0
        if th.no_speech is not None:
            kw.update(no_speech_fields(st.sot_index, tokens.no_speech))
        if t == 0 and opts.beam_size > 1:
            kw["num_beams"] = opts.beam_size
        elif t > 0:
            kw["num_return_sequences"] = opts.best_of
            kw["seed"] = _seed(opts.seed, f.index, st.number, st.seek, index)
        return Request(
            AudioInput(window, language=f.result.language or "en", task=opts.task, padding="features"),
            decoder_prefix=prefix,
            temperature=t,
            adapter_id=opts.adapter,
            **kw,
        )

    def _decide(self, st: _Stream) -> _Attempt | None:
        """The window's decode to keep, once the temperatures before it are tried; None: wait."""
        tried = []
        for index in range(len(self.options.temperatures)):
            if index not in st.tried:
                return None
            tried.append(st.tried[index])
            chosen = self._choose(tried)
            if chosen is not None:
                return chosen
        return None

    def _next_needed(self, st: _Stream) -> int | None:
        """The first temperature index neither tried nor in flight, if no earlier one is in flight."""
        for index in range(len(self.options.temperatures)):
            if index in st.asked:
                return None
            if index not in st.tried:
                return index
        return None

    def _next_untried(self, st: _Stream) -> int | None:
        """The first temperature index neither tried nor in flight (a speculative decode)."""
        indices = range(len(self.options.temperatures))
        return next((i for i in indices if i not in st.tried and i not in st.asked), None)

    def _window_done(self, st: _Stream, attempt: _Attempt) -> bool:
        """Keep a window's chosen decode; True when the stream has another window to decode."""
        st.tried.clear()
        opts, tokens = self.options, self.tokens
        content = min(WINDOW_FRAMES, st.frames - st.seek)
        offset = (st.start / SAMPLE_RATE) + st.seek / FRAMES_PER_SECOND
        if is_silent(attempt.no_speech_prob, attempt.avg_logprob, opts.thresholds):
            st.seek += content
        else:
            if opts.timestamps:
                split = split_window(attempt.tokens, tokens.timestamp_begin, content)
                pieces, advance = split.segments, split.seek_frames
            else:
                pieces, advance = [(0.0, content / FRAMES_PER_SECOND, attempt.tokens)], content
            for start, end, piece in pieces:
                text = tokens.decode(self.engine.model.tokenizer, piece)
                if end <= start or not text:
                    continue
                st.segments.append(
                    Segment(
                        start=round(offset + start, 3),
                        end=round(offset + end, 3),
                        text=text,
                        tokens=piece,
                        avg_logprob=attempt.avg_logprob,
                        compression_ratio=attempt.ratio,
                        no_speech_prob=attempt.no_speech_prob,
                        temperature=attempt.temperature,
                    )
                )
                st.tokens.extend(piece)
            st.seek += advance
            if not opts.condition_on_previous_text or attempt.temperature > opts.prompt_reset_on_temperature:
                st.prompt_from = len(st.tokens)
        if st.number == 0 and "first_segment" not in st.file.result.timings:
            st.file.result.timings["first_segment"] = time.perf_counter() - self._start
        return st.seek < st.frames and self._speech_left(st)

    def _choose(self, attempts: list[_Attempt]) -> _Attempt | None:
        """The decode to keep, or None to decode again at the next temperature."""
        th, last = self.options.thresholds, attempts[-1]
        if not needs_fallback(last.ratio, last.avg_logprob, last.no_speech_prob, th):
            return last
        if len(attempts) < len(self.options.temperatures):
            return None
        # Every temperature failed: the likeliest decode that is not a repetition loop.
        fine = [a for a in attempts if th.compression_ratio is None or a.ratio <= th.compression_ratio]
        best = max(fine or attempts, key=lambda a: -math.inf if a.avg_logprob is None else a.avg_logprob)
        return dataclasses.replace(best, temperature=last.temperature)

    def _speech_left(self, st: _Stream) -> bool:
        """Whether the rest of a chunk holds speech (always, without the detector)."""
        speech = st.file.speech
        if speech is None:
            return True
        first = (st.start + st.seek * HOP_LENGTH) // FRAME
        last = (st.start + len(st.samples)) // FRAME
        return bool(np.any(speech[first:last]))

    def _attempt(self, st: _Stream, index: int, out: RequestOutput) -> _Attempt:
        tokens, eot = self.tokens, self.tokens.eot
        temperature = self.options.temperatures[index]
        seqs = out.sequences or [out]
        if temperature > 0:  # samples: openai-whisper keeps the highest average log-probability
            seqs = sorted(seqs, key=lambda s: -sum(s.logprobs) / max(1, len(_generated(s.token_ids, eot))))
        best = seqs[0]  # beams: the best hypothesis comes first
        generated = _generated(best.token_ids, eot)
        avg = None if best.logprobs is None else average_logprob(best.logprobs, len(generated))
        text = tokens.decode(self.engine.model.tokenizer, text_tokens(generated, eot))
        no_speech = no_speech_prob(out.prompt_logprobs, st.sot_index, self.tokens.no_speech)
        return _Attempt(temperature, generated, avg, compression_ratio(text), no_speech)


def _generated(token_ids: Sequence[int], eot: int) -> list[int]:
    ids = list(token_ids)
    return ids[:-1] if ids and ids[-1] == eot else ids


def _name(source: Any, i: int) -> str:
    return str(source) if isinstance(source, str | Path) else f"audio[{i}]"


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + p) % (2**31 - 1)
    return h
