"""Requests, their validation, and what the engine returns for each."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from encdec.engine.config import EngineConfig


class RequestError(ValueError):
    """A request the engine cannot serve; nothing else in the engine is affected."""


@dataclasses.dataclass
class Request:
    """One generation request: text (through the model's tokenizer) or token ids."""

    inputs: str | Sequence[int]
    max_new_tokens: int = 32
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


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    token_ids: list[int]
    finish_reason: str
    """``stop`` (EOS or a stop token), ``length``, ``cancelled`` or ``error``."""
    text: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """``time.perf_counter()`` stamps: ``arrival``, ``admitted``, ``first_token``, ``done``."""
    error: str | None = None


def validate(request: Request, ids: list[int], config: EngineConfig, vocab_size: int, adapters) -> list[int]:
    """Check a request against the engine's limits; return its (possibly truncated) input ids."""
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
    if not 0 < request.max_new_tokens <= config.max_new_tokens:
        raise RequestError(
            f"max_new_tokens must be in [1, {config.max_new_tokens}], got {request.max_new_tokens}"
        )
    if not 0 <= request.min_new_tokens <= request.max_new_tokens:
        raise RequestError(f"min_new_tokens must be in [0, max_new_tokens], got {request.min_new_tokens}")
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
    return ids
