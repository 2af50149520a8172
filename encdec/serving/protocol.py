"""The OpenAI wire format: request bodies (pydantic, JSON types only), responses, error bodies.

Request models check only what JSON can get wrong: the type of each field (strictly: ``4.0``
is not an integer, ``true`` is not a number) and unknown fields. What a value may be (ranges,
budgets, vocabulary) is the engine's rule: the handlers build an ``encdec.engine.Request`` and
its checks answer, so the server and the library never disagree.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from encdec.serving.formats import ResponseFormat


class APIError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    """Send a last chunk with the usage figures (and no choices) before ``[DONE]``."""


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. The ``top_k``, ``min_tokens``, ``stop_token_ids`` and
    ``repetition_penalty`` extensions are vLLM's names for the engine's fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = None
    """None: 1 (OpenAI's default); 0 is greedy."""
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, int] | None = None
    user: str | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """The first parameter set to something the engine cannot do yet: ``(param, why)``."""
        checks = (
            ("echo", bool(self.echo), "echo is not supported: the prompt is the encoder's input"),
            ("suffix", bool(self.suffix), "suffix is not supported"),
            (
                "frequency_penalty",
                self.frequency_penalty not in (None, 0.0),
                "frequency_penalty is not supported",
            ),
            (
                "presence_penalty",
                self.presence_penalty not in (None, 0.0),
                "presence_penalty is not supported",
            ),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
        )
        return next(((param, why) for param, bad, why in checks if bad), None)

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or token-id list, or a list of them."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        return list(p)

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops


class TranscriptionForm(BaseModel):
    """The fields of ``POST /v1/audio/transcriptions`` and ``/translations`` besides ``file``."""

    model_config = ConfigDict(extra="forbid")  # form fields arrive as strings: parsed, not strict

    model: str
    language: str | None = None
    """The spoken language (ISO 639-1); None: detected from the first 30 s (English-only models:
    English)."""
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    temperature: float = 0.0
    timestamp_granularities: list[Literal["segment", "word"]] | None = None


FRIENDLY = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
}
"""Messages for union-typed fields, whose pydantic errors list every alternative."""


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """One message naming the first offending field, and the field (``param``)."""
    if errors[0]["type"] == "json_invalid":  # loc: ("body", character)
        why = (errors[0].get("ctx") or {}).get("error")
        where = f"at character {errors[0]['loc'][-1]}"
        return f"the body is not valid JSON ({f'{why}, ' if why else ''}{where})", None
    if tuple(errors[0]["loc"]) == ("body",):
        if errors[0]["type"] == "missing":
            return "the request has no body: send a JSON object", None
        if errors[0]["type"] in ("model_attributes_type", "dict_type"):
            got = errors[0].get("input")
            if isinstance(got, str | bytes):  # not parsed: another Content-Type
                return "the body must be a JSON object sent with Content-Type: application/json", None
            kinds = {list: "an array", type(None): "null", bool: "a boolean"}
            kind = kinds.get(type(got), type(got).__name__)
            return f"the body must be a JSON object, got {kind}", None
    loc = [str(x) for x in errors[0]["loc"] if x not in ("body", "query", "form")]
    param = loc[0] if loc else None
    if param in FRIENDLY and errors[0]["type"] not in ("missing", "extra_forbidden"):
        return f"{param}: {FRIENDLY[param]}", param
    where = ".".join(loc) or "body"
    msg = errors[0]["msg"]
    if errors[0]["type"] == "extra_forbidden":
        msg = "is not a known parameter"
    elif errors[0]["type"] == "missing":
        msg = "is required"
    return f"{where}: {msg}", param


def parse_form(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    """A form model from its fields; errors as a 400 :class:`APIError` naming the field."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise APIError(400, message, param=param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    cid: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict[str, int] | None
) -> dict[str, Any]:
    """A completion, or one streamed chunk of it (same object, ``usage`` None in chunks)."""
    body = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
