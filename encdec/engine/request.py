"""Requests, their checks at the engine's door, and what the engine returns for each.

:func:`checked_request` runs every field's rule (:mod:`encdec.engine.validation`), so a value
the device cannot hold (a float ``max_new_tokens``, a seed past int32, ``temperature=inf``, a
``top_p`` that float32 rounds to zero) is a :class:`RequestError` naming the field, before the
request is queued. The front end checks ``inputs``; :func:`check_limits` checks what depends on
the engine and the model (token budget, vocabulary, stop-token and prefix widths, adapters).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from typing import Any, Literal

from encdec.engine.config import EngineConfig
from encdec.engine.validation import FieldError, Float, Int, Text, TokenIds, check_fields, rule

FinishReason = Literal["stop", "length", "cancelled", "error"]
"""``stop`` (EOS or a stop token), ``length`` (``max_new_tokens``), ``cancelled`` or ``error``."""


class RequestError(ValueError):
    """A request the engine cannot serve; nothing else in the engine is affected."""


@dataclasses.dataclass
class Request:
    """One generation request: text (through the model's tokenizer), token ids, or what the
    engine's front end reads (audio for Whisper: see ``encdec.whisper.AudioInput``)."""

    inputs: Any
    """Text or token ids (a list, tuple or 1-D integer array) for a text model; for an audio
    model (Whisper) an ``encdec.whisper.AudioInput``, a WAV path or a 1-D float array of 16 kHz
    samples."""
    max_new_tokens: int | None = rule(Int(1, optional=True), None)
    """Most tokens to generate. None: ``min(32, EngineConfig.max_new_tokens)`` for text; for
    audio the model's limit (CTranslate2's ``min(P / 2, P - prompt)`` of ``P`` decoder positions,
    and at most ``EngineConfig.max_new_tokens``). Audio requests asking for more are capped."""
    min_new_tokens: int = rule(Int(0), 0)
    """EOS is banned until this many tokens are out (benchmarks force exact lengths with it)."""
    temperature: float = rule(Float(0.0), 0.0)
    """0 is greedy."""
    top_k: int = rule(Int(0), 0)
    """0 disables top-k."""
    top_p: float = rule(Float(0.0, 1.0, open_low=True), 1.0)
    """1 disables top-p."""
    seed: int | None = rule(Int(), 0)
    """A request's samples depend only on its seed, never on what shares the batch (int32).
    None: a fresh random seed, drawn when the request is submitted."""
    stop_token_ids: Sequence[int] = rule(TokenIds(), ())
    """Tokens that end the sequence besides EOS (kept in the output, like EOS)."""
    adapter_id: str | None = rule(Text(optional=True), None)
    """LoRA adapter to apply (None: the base model)."""
    arrival_time: float | None = rule(Float(0.0, math.inf, optional=True, float64=True), None)
    """For :meth:`Engine.generate`: seconds after the call at which the request arrives."""
    decoder_prefix: Sequence[int] | None = rule(TokenIds(min_len=1, optional=True), None)
    """Forced first decoder tokens, the start token included: the decoder reads them before it
    samples, and they are not part of the output. None: the front end's default (the decoder
    start token for text; Whisper's ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``).
    At most ``EngineConfig.max_decoder_prefix`` tokens."""


@dataclasses.dataclass
class RequestOutput:
    """What a request produced; ``request_id`` is its handle (for rejected requests too)."""

    request_id: int
    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None = None
    """Decoded ``token_ids`` without special tokens (text and audio inputs, with a tokenizer)."""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """``time.perf_counter()`` stamps: ``arrival``, ``admitted``, ``first_token``, ``done``."""
    error: str | None = None
    """Why the request failed (``finish_reason == "error"``)."""
    audio_seconds: float | None = None
    """Length of an audio input."""


def checked_request(request: Any) -> Request:
    """``request`` with every field checked and normalized (plain ints, floats and tuples, a
    drawn seed for ``seed=None``); anything else is a :class:`RequestError` naming the field."""
    if not isinstance(request, Request):
        raise RequestError(f"a request must be an encdec Request, got {type(request).__name__}")
    seed = request.seed
    try:
        values = check_fields(dataclasses.replace(request, seed=0) if seed is None else request)
    except FieldError as e:
        raise RequestError(str(e)) from None
    if seed is None:
        values["seed"] = secrets.randbelow(2**31)
    return dataclasses.replace(request, **values)


def check_limits(
    request: Request,
    config: EngineConfig,
    *,
    max_new_tokens: int,
    prefix: Sequence[int],
    max_prefix: int,
    decoder_vocab_size: int,
    adapters: Any,
) -> None:
    """The engine's and the model's limits on a checked request (budget and prefix resolved)."""
    if not 0 < max_new_tokens <= config.max_new_tokens:
        raise RequestError(f"max_new_tokens must be in [1, {config.max_new_tokens}], got {max_new_tokens}")
    if not 0 <= request.min_new_tokens <= max_new_tokens:
        raise RequestError(
            f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {request.min_new_tokens}"
        )
    if not 0 < len(prefix) <= max_prefix:
        raise RequestError(
            f"decoder_prefix must have 1 to {max_prefix} tokens (EngineConfig.max_decoder_prefix), "
            f"got {len(prefix)}"
        )
    for name, ids in (("decoder_prefix", prefix), ("stop_token_ids", request.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < decoder_vocab_size]
        if bad:
            raise RequestError(f"{name} has ids outside the vocabulary [0, {decoder_vocab_size}): {bad[:5]}")
    if len(request.stop_token_ids) > config.max_stop_tokens:
        raise RequestError(
            f"at most {config.max_stop_tokens} stop_token_ids (EngineConfig.max_stop_tokens), "
            f"got {len(request.stop_token_ids)}"
        )
    if request.adapter_id is not None and (adapters is None or request.adapter_id not in adapters):
        raise RequestError(f"unknown adapter id {request.adapter_id!r}")
