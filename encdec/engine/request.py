"""Requests, their validation, and what the engine returns for each."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from encdec.engine.config import EngineConfig

DEFAULT_MAX_NEW_TOKENS = 32
"""``max_new_tokens`` of a text request that does not set it."""


class RequestError(ValueError):
    """A request the engine cannot serve; nothing else in the engine is affected."""


@dataclasses.dataclass
class AudioInput:
    """Audio for a model with an audio encoder (Whisper): at most one 30 s window.

    The host reads it at :meth:`Engine.submit`, resamples it to 16 kHz and computes its log-mel
    window there; unreadable, empty or longer than 30 s audio fails that request alone with a
    :class:`RequestError`. Split longer audio into one request per window
    (``encdec.whisper.audio.split_windows``), as ``encdec transcribe`` does.
    """

    source: str | os.PathLike | Any
    """A WAV path, or float samples in [-1, 1] (``[n]`` or ``[n, channels]``, e.g. a numpy array)."""
    sample_rate: int | None = None
    """Rate of an array ``source`` (None: 16 kHz); a WAV file's rate is read from its header."""
    language: str = "en"
    """Spoken language, for the model's default decoder prompt (``<|en|>``)."""
    task: str = "transcribe"
    """``transcribe`` or ``translate`` (into English), for the default decoder prompt."""


@dataclasses.dataclass
class Request:
    """One generation request: text (through the model's tokenizer), token ids, or audio."""

    inputs: str | Sequence[int] | AudioInput | os.PathLike | Any
    """Text or token ids. For an audio model (Whisper) the inputs are audio: an
    :class:`AudioInput`, a WAV path (``str`` or ``Path``) or a 1-D float array of 16 kHz samples."""
    max_new_tokens: int | None = None
    """Most tokens to generate. None: ``DEFAULT_MAX_NEW_TOKENS`` for text; for audio the model's
    limit (CTranslate2's ``min(P / 2, P - prompt)`` of ``P`` decoder positions, and at most
    ``EngineConfig.max_new_tokens``). Audio requests asking for more are capped at that limit."""
    min_new_tokens: int = 0
    """EOS is banned until this many tokens are out (benchmarks force exact lengths with it)."""
    temperature: float = 0.0
    """0 is greedy."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    """1 disables top-p."""
    seed: int = 0
    """A request's samples depend only on its seed, never on what shares the batch."""
    stop_token_ids: Sequence[int] = ()
    """Tokens that end the sequence besides EOS (kept in the output, like EOS)."""
    adapter_id: str | None = None
    """LoRA adapter to apply (None: the base model)."""
    arrival_time: float | None = None
    """For :meth:`Engine.generate`: seconds after the call at which the request arrives."""
    decoder_prefix: Sequence[int] | None = None
    """Forced first decoder tokens, the start token included: the decoder reads them before it
    samples, and they are not part of the output. None: the decoder start token for text; for
    audio Whisper's ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``. At most
    ``EngineConfig.max_decoder_prefix`` tokens."""


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    token_ids: list[int]
    finish_reason: str
    """``stop`` (EOS or a stop token), ``length``, ``cancelled`` or ``error``."""
    text: str | None = None
    """Decoded ``token_ids`` without special tokens (text and audio inputs, with a tokenizer)."""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """``time.perf_counter()`` stamps: ``arrival``, ``admitted``, ``first_token``, ``done``."""
    error: str | None = None
    audio_seconds: float | None = None
    """Length of an audio input."""


def check_inputs(ids: list[int], config: EngineConfig, vocab_size: int) -> list[int]:
    """Check token-id inputs against the engine's limits; return them (possibly truncated)."""
    if not ids:
        raise RequestError("input is empty")
    if len(ids) > config.max_encoder_len:
        if not config.truncate_long_inputs:
            raise RequestError(
                f"input has {len(ids)} tokens, above max_encoder_len={config.max_encoder_len} "
                "(set truncate_long_inputs=True to truncate)"
            )
        ids = ids[: config.max_encoder_len]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids


def validate(
    request: Request,
    config: EngineConfig,
    adapters,
    *,
    max_new_tokens: int,
    prefix: Sequence[int],
    max_prefix: int,
    decoder_vocab_size: int,
) -> None:
    """Check a request's generation options (``max_new_tokens`` and ``prefix`` resolved)."""
    if not 0 < max_new_tokens <= config.max_new_tokens:
        raise RequestError(f"max_new_tokens must be in [1, {config.max_new_tokens}], got {max_new_tokens}")
    if not 0 <= request.min_new_tokens <= max_new_tokens:
        raise RequestError(f"min_new_tokens must be in [0, max_new_tokens], got {request.min_new_tokens}")
    if not 0 < len(prefix) <= max_prefix:
        raise RequestError(
            f"decoder_prefix must have 1 to {max_prefix} tokens (EngineConfig.max_decoder_prefix), "
            f"got {len(prefix)}"
        )
    bad = [t for t in prefix if not 0 <= t < decoder_vocab_size]
    if bad:
        raise RequestError(f"decoder_prefix ids outside the vocabulary [0, {decoder_vocab_size}): {bad[:5]}")
    if not request.temperature >= 0:
        raise RequestError(f"temperature must be >= 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {request.top_p}")
    if request.top_k < 0:
        raise RequestError(f"top_k must be >= 0, got {request.top_k}")
    if len(request.stop_token_ids) > config.max_stop_tokens:
        raise RequestError(
            f"at most {config.max_stop_tokens} stop_token_ids, got {len(request.stop_token_ids)}"
        )
    if request.adapter_id is not None and (adapters is None or request.adapter_id not in adapters):
        raise RequestError(f"unknown adapter id {request.adapter_id!r}")
