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
from encdec.engine.validation import FieldError, Float, Int, OneOf, Text, Texts, TokenIds, check_fields, rule

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
    # ---- decoding (HF ``generate`` semantics) ----
    num_beams: int = rule(Int(1), 1)
    """Beam search over this many beams, one decode slot each, sharing one copy of the cross K/V
    (at most ``EngineConfig.max_num_beams`` and the slot count); greedy only (temperature 0)."""
    length_penalty: float = rule(Float(), 1.0)
    """Beam scores are ``sum(logprobs) / length ** length_penalty``."""
    early_stopping: bool | str = rule(OneOf((False, True, "never")), False)
    """Beam search stops: True once ``num_beams`` hypotheses are finished; False when HF's
    heuristic says no running beam can do better; ``"never"`` by the exact bound."""
    num_return_sequences: int = rule(Int(1), 1)
    """Sequences to return: the best of the beams (at most ``num_beams``), or, when sampling
    with one beam, that many independent samples sharing one encoder pass."""
    repetition_penalty: float = rule(Float(0.0, open_low=True), 1.0)
    """Scores of tokens already in the decoder sequence are divided by it (multiplied when
    negative); 1 is off."""
    no_repeat_ngram_size: int | None = rule(Int(1, optional=True), None)
    """No n-gram of this size occurs twice in the decoder sequence; None is off."""
    suppress_tokens: Sequence[int] = rule(TokenIds(), ())
    """Tokens never generated (at most ``EngineConfig.max_suppress_tokens``)."""
    begin_suppress_tokens: Sequence[int] = rule(TokenIds(), ())
    """Tokens not generated first."""
    forced_bos_token_id: int | None = rule(Int(0, optional=True), None)
    """Token forced as the first generated token, and part of the output (mBART's and NLLB's
    target language)."""
    forced_eos_token_id: int | None = rule(Int(0, optional=True), None)
    """Token forced as the last one when ``max_new_tokens`` is reached."""
    # ---- outputs ----
    logprobs: int | None = rule(Int(0, optional=True), None)
    """None: no log-probabilities; 0: each output token's; n: also the n most likely tokens at
    each step (at most ``EngineConfig.max_logprobs``). They are ``log_softmax`` of the processed
    scores (after logits processors, before temperature, top-k and top-p)."""
    prompt_logprobs: int | None = rule(Int(0, optional=True), None)
    """The n most likely tokens, and the forced token, at each forced decoder-prefix position
    after the first (entry i predicts prefix token i + 1); None: not reported."""
    prompt_logprobs_from: int = rule(Int(0), 0)
    """With ``prompt_logprobs``: the first prefix position reported; earlier entries are empty,
    and the engine stores those positions at once instead of a decode step each (Whisper asks
    only from ``<|startoftranscript|>`` on, not over its previous-text prompt)."""
    prompt_logprob_token_id: int | None = rule(Int(0, optional=True), None)
    """With ``prompt_logprobs``: a token whose log-probability every reported entry also holds,
    likely or not (Whisper's ``<|nospeech|>`` after ``<|startoftranscript|>``: its
    ``no_speech_prob``)."""
    stop: Sequence[str] = rule(Texts(), ())
    """Strings that end the sequence when its text contains one; the text then ends before it."""


@dataclasses.dataclass
class SequenceOutput:
    """One generated sequence: a request's only one, or one of its beams or samples."""

    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None = None
    logprobs: list[float] | None = None
    """Each token's log-probability (``Request.logprobs`` not None)."""
    top_logprobs: list[dict[int, float]] | None = None
    """The most likely tokens at each step (``Request.logprobs`` > 0; not for beams)."""
    cumulative_logprob: float | None = None
    """Sum of ``logprobs``."""
    score: float | None = None
    """A beam hypothesis's length-penalized score (HF's ``sequences_scores``)."""


@dataclasses.dataclass
class RequestOutput:
    """What a request produced; ``request_id`` is its handle (for rejected requests too).

    The top-level ``token_ids``, ``text`` and log-probabilities are those of ``sequences[0]``,
    the best beam or the first sample.
    """

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
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[dict[int, float]] | None = None
    """Per forced prefix position after the first: the top tokens and the forced one."""
    sequences: list[SequenceOutput] = dataclasses.field(default_factory=list)
    """Every returned sequence, best (beams) or first (samples) first."""


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
        _check_vocab(name, ids, decoder_vocab_size)
    if len(request.stop_token_ids) > config.max_stop_tokens:
        raise RequestError(
            f"at most {config.max_stop_tokens} stop_token_ids (EngineConfig.max_stop_tokens), "
            f"got {len(request.stop_token_ids)}"
        )
    if request.adapter_id is not None and (adapters is None or request.adapter_id not in adapters):
        raise RequestError(f"unknown adapter id {request.adapter_id!r}")
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        ids = getattr(request, name)
        if len(ids) > config.max_suppress_tokens:
            raise RequestError(
                f"at most {config.max_suppress_tokens} {name} (EngineConfig.max_suppress_tokens), "
                f"got {len(ids)}"
            )
        _check_vocab(name, ids, decoder_vocab_size)
    for name in ("forced_bos_token_id", "forced_eos_token_id", "prompt_logprob_token_id"):
        token = getattr(request, name)
        if token is not None:
            _check_vocab(name, (token,), decoder_vocab_size)
    _check_forced(request, max_new_tokens)
    if request.prompt_logprob_token_id is not None and request.prompt_logprobs is None:
        raise RequestError("prompt_logprob_token_id is reported in prompt_logprobs: set prompt_logprobs too")
    for name in ("logprobs", "prompt_logprobs"):
        n = getattr(request, name)
        if n is not None and n > config.max_logprobs:
            raise RequestError(
                f"{name} must be at most {config.max_logprobs} (EngineConfig.max_logprobs), got {n}"
            )
    n_gram = request.no_repeat_ngram_size
    if n_gram is not None and n_gram > len(prefix) + max_new_tokens:
        raise RequestError(
            f"no_repeat_ngram_size={n_gram} exceeds the {len(prefix) + max_new_tokens} tokens the sequence "
            "can hold: it could never apply"
        )
    check_group(request, config)


def check_group(request: Request, config: EngineConfig) -> None:
    """Beams and samples: how many slots the request holds, and which combinations make sense."""
    beams, n = request.num_beams, request.num_return_sequences
    most = min(config.max_num_beams, config.num_slots)
    if beams > most:
        raise RequestError(
            f"num_beams={beams} exceeds the {most} slots one request may hold "
            f"(EngineConfig.max_num_beams={config.max_num_beams}, num_slots={config.num_slots})"
        )
    if beams > 1:
        if request.temperature > 0:
            raise RequestError(
                "beam search is greedy: num_beams > 1 needs temperature=0 (beam sampling is not supported)"
            )
        if n > beams:
            raise RequestError(f"num_return_sequences={n} exceeds num_beams={beams}")
    elif n > 1:
        if request.temperature == 0:
            raise RequestError(
                "num_return_sequences > 1 needs beam search (num_beams >= it) or sampling (temperature > 0)"
            )
        if n > most:
            raise RequestError(f"num_return_sequences={n} exceeds the {most} slots one request may hold")


def group_width(request: Request) -> int:
    """Decode slots the request holds."""
    return max(request.num_beams, request.num_return_sequences)


def _check_forced(request: Request, max_new_tokens: int) -> None:
    """A forced token that is also suppressed at its step leaves that step no token to choose
    (every score -inf: beam search keeps no hypothesis, greedy picks an arbitrary id)."""
    first = ("suppress_tokens", "begin_suppress_tokens")
    last = first if max_new_tokens == 1 else first[:1]  # the last step is the first too
    for name, banned in (("forced_bos_token_id", first), ("forced_eos_token_id", last)):
        token = getattr(request, name)
        for ban in banned:
            if token is not None and token in getattr(request, ban):
                raise RequestError(
                    f"{name}={token} is also in {ban}: that step would have no token left to generate"
                )


def _check_vocab(name: str, ids: Sequence[int], vocab: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
