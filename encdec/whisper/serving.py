"""Whisper engines, and fixed-window transcription through one.

:func:`whisper_engine` builds an engine with Whisper's front end; :func:`longform_engine` sizes
one for long-form transcription (:mod:`encdec.whisper.longform`, ``encdec transcribe``).

:func:`transcribe_with_engine` is the plain path without timestamps: every file's audio split
into fixed 30 s windows, each window one engine request (log-mel at submit, encoder in the
engine's encoder batches, cross K/V in the cross page pool, Whisper's prompt as a forced decoder
prefix), the window texts joined, as :func:`transcribe` does on its dense cache (a word at a
cut may be lost). A file that cannot be read fails alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.engine import Engine, EngineConfig, Request, RequestOutput
from encdec.lora.bank import AdapterBank
from encdec.whisper.audio import AudioError, load_audio, split_windows
from encdec.whisper.frontend import AudioInput, WhisperFrontEnd
from encdec.whisper.options import LongFormOptions
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import Transcript


def whisper_engine_config(
    model: Model,
    *,
    num_slots: int = 16,
    encoder_batch: int = 4,
    steps_per_dispatch: int = 4,
    page_size: int = 16,
    prompt_len: int = 4,
) -> EngineConfig:
    """An engine config for a Whisper model: ``num_slots`` windows decoded together, at most
    ``encoder_batch`` windows per encoder call, prompts of up to ``prompt_len`` tokens and the
    model's token limit after them, a cross pool for ``num_slots`` windows."""
    cfg = model.config
    P = cfg.max_positions
    return EngineConfig(
        num_slots=num_slots,
        page_size=page_size,
        max_new_tokens=min(P // 2, P - prompt_len + 1),
        max_encoder_batch=encoder_batch,
        max_encoder_tokens=encoder_batch * cfg.audio_positions,
        steps_per_dispatch=steps_per_dispatch,
        max_decoder_prefix=prompt_len,
    )


def whisper_engine(
    model: Model,
    config: EngineConfig | None = None,
    *,
    tokens: WhisperTokens | None = None,
    adapters: AdapterBank | None = None,
    max_initial_timestamp: float | None = 1.0,
    **config_kw,
) -> Engine:
    """An :class:`Engine` serving ``model``'s audio requests through a :class:`WhisperFrontEnd`.

    ``config``: the engine's config, else :func:`whisper_engine_config` with ``config_kw``.
    ``tokens`` overrides the special tokens and suppression lists of the model's directory.
    """
    if config is not None and config_kw:
        raise ValueError(f"give config or whisper_engine_config options, not both: {sorted(config_kw)}")
    config = config or whisper_engine_config(model, **config_kw)
    frontend = WhisperFrontEnd(model, tokens, max_initial_timestamp=max_initial_timestamp)
    return Engine(model, config, frontend=frontend, adapters=adapters)


def longform_engine(
    model: Model,
    options: LongFormOptions | None = None,
    *,
    num_slots: int = 16,
    encoder_batch: int = 4,
    steps_per_dispatch: int = 4,
    max_initial_timestamp: float | None = 1.0,
    tokens: WhisperTokens | None = None,
    adapters: AdapterBank | None = None,
) -> Engine:
    """A Whisper engine sized for :class:`~encdec.whisper.longform.LongFormTranscriber` with
    ``options``: prompts with the previous text fit, ``beam_size`` beams fit in the slots."""
    options = options or LongFormOptions()
    sampling = any(t > 0 for t in options.temperatures)
    if max(options.beam_size, options.best_of if sampling else 1) > num_slots:
        raise ValueError(
            f"beam_size={options.beam_size} and best_of={options.best_of} each need as many decode slots, "
            f"got num_slots={num_slots}"
        )
    tokens = tokens or WhisperTokens.from_dir(model.path)
    return whisper_engine(
        model,
        tokens=tokens,
        num_slots=num_slots,
        encoder_batch=encoder_batch,
        steps_per_dispatch=steps_per_dispatch,
        prompt_len=max(len(tokens.prompt()), options.prefix_len(model.config.max_positions)),
        max_initial_timestamp=max_initial_timestamp,
        adapters=adapters,
    )


def transcribe_with_engine(
    engine: Engine,
    audio: Sequence[str | Path | np.ndarray],
    *,
    language: str = "en",
    task: str = "transcribe",
    max_new_tokens: int | None = None,
) -> list[Transcript]:
    """Transcribe WAV paths or 16 kHz arrays, every 30 s window an engine request.

    Unreadable or empty audio gives a transcript with ``finish_reason="error"`` and its
    ``error``; the other files are served. ``timings`` are the engine's stamps, earliest
    ``arrival``/``admitted``/``first_token`` and latest ``done`` over the file's windows.
    """
    if not isinstance(engine.frontend, WhisperFrontEnd):
        raise ValueError("the engine has no Whisper front end (build it with whisper_engine)")
    tokens: WhisperTokens = engine.frontend.tokens
    tokens.prompt(language, task)  # an unknown language or task fails the whole call, up front
    windows: list[list[np.ndarray] | str] = []
    for source in audio:
        try:
            samples = load_audio(source)
            windows.append(split_windows(samples))
        except AudioError as e:
            windows.append(str(e))
    requests = [
        Request(inputs=AudioInput(w, language=language, task=task), max_new_tokens=max_new_tokens)
        for ws in windows
        if not isinstance(ws, str)
        for w in ws
    ]
    outputs = iter(engine.generate(requests))
    results = []
    for ws in windows:
        if isinstance(ws, str):
            results.append(Transcript("", [], 0.0, "error", error=ws))
            continue
        results.append(_join(tokens, engine.model.tokenizer, [next(outputs) for _ in ws]))
    return results


def _join(tokens: WhisperTokens, tokenizer, outputs: list[RequestOutput]) -> Transcript:
    seconds = sum(o.audio_seconds or 0.0 for o in outputs)
    errors = [o.error for o in outputs if o.finish_reason == "error"]
    if errors:
        return Transcript("", [], seconds, "error", error=errors[0])
    ids = [[t for t in o.token_ids if t != tokens.eot] for o in outputs]
    texts = [
        tokens.decode(tokenizer, w) if o.text is None else o.text for o, w in zip(outputs, ids, strict=True)
    ]
    stamps = [o.timings for o in outputs]
    timings = {
        k: min(s[k] for s in stamps)
        for k in ("arrival", "admitted", "first_token")
        if all(k in s for s in stamps)
    }
    timings["done"] = max(s["done"] for s in stamps)
    return Transcript(
        text=" ".join(t for t in texts if t),
        token_ids=[t for w in ids for t in w],
        audio_seconds=seconds,
        finish_reason="stop" if all(o.finish_reason == "stop" for o in outputs) else "length",
        timings=timings,
    )
