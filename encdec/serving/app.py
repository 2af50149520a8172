"""The OpenAI-compatible HTTP app (FastAPI) over one :class:`~encdec.serving.models.ServedModel`.

Routes: ``POST /v1/completions``, ``POST /v1/audio/transcriptions``, ``POST
/v1/audio/translations``, ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``,
``GET /metrics``. With an API key, every ``/v1`` route wants ``Authorization: Bearer KEY``
(compared in constant time); ``/health`` and ``/metrics`` stay open, as in vLLM.

Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``: 400 for
a bad request (a JSON type, or the engine's own check of a value, with the engine's field
names translated to the API's), 401 for a wrong key, 404 for an unknown model or route, 413
for an upload over the limit, 429 when the engine holds ``max_pending`` requests, 503 when it
is shutting down or its loop has died.
"""

from __future__ import annotations

import hmac
import re

from fastapi import APIRouter, Depends, FastAPI, Header
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from encdec.engine import Overloaded, RequestError
from encdec.engine.async_engine import EngineUnavailable
from encdec.serving.completions import create_completion
from encdec.serving.models import ServedModel
from encdec.serving.protocol import APIError, CompletionRequest, error_body, validation_message
from encdec.serving.streaming import ClientDisconnected
from encdec.serving.transcriptions import DEFAULT_MAX_UPLOAD_BYTES, create_transcription

API_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "inputs": "prompt",
    "AudioInput.language": "language",
    "AudioInput.task": "task",
    "num_return_sequences": "n",
    "num_beams": "best_of",
}
"""Engine field names in error messages -> the API parameter they come from."""
_FIELD = re.compile(r"^([A-Za-z_.]+)")


def request_error(e: RequestError) -> APIError:
    """A 400 naming the API parameter for the engine's message about a request field."""
    message = str(e)
    for engine_name, api_name in API_NAMES.items():
        message = re.sub(rf"\b{re.escape(engine_name)}\b", api_name, message)
    match = _FIELD.match(message)
    first = match.group(1) if match else None
    params = {
        *API_NAMES.values(),
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop_token_ids",
        "model",
        "logprobs",
    }
    params |= {"stop", "repetition_penalty", "no_repeat_ngram_size"}
    return APIError(400, message, param=first if first in params else None)


def build_app(
    served: ServedModel, *, api_key: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> FastAPI:
    """The app; the engine's lifetime is the caller's (see :mod:`encdec.serving.server`)."""
    app = FastAPI(title="encdec", description="OpenAI-compatible serving of encoder-decoder models")
    key = None if api_key is None else api_key.encode()

    async def authorize(authorization: str | None = Header(default=None)) -> None:
        if key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if not hmac.compare_digest(given.strip().encode(), key) or scheme.lower() != "bearer":
            raise APIError(
                401,
                "invalid or missing API key: send `Authorization: Bearer <key>`",
                type="authentication_error",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest) -> Response:
        return await create_completion(served, body, request)

    @v1.post("/audio/transcriptions")
    async def transcriptions(request: HTTPRequest) -> Response:
        return await create_transcription(
            served, request, task="transcribe", max_upload_bytes=max_upload_bytes
        )

    @v1.post("/audio/translations")
    async def translations(request: HTTPRequest) -> Response:
        return await create_transcription(
            served, request, task="translate", max_upload_bytes=max_upload_bytes
        )

    def model_card(model_id: str, parent: str | None) -> dict:
        return {
            "id": model_id,
            "object": "model",
            "created": served.created,
            "owned_by": "encdec",
            "root": served.name,
            "parent": parent,
        }

    @v1.get("/models")
    async def models() -> dict:
        cards = [model_card(served.name, None)] + [model_card(a, served.name) for a in served.adapter_ids]
        return {"object": "list", "data": cards}

    @v1.get("/models/{model_id}")
    async def model(model_id: str) -> dict:
        adapter = served.resolve(model_id)
        return model_card(model_id, None if adapter is None else served.name)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        engine = served.engine
        if engine.alive:
            return JSONResponse({"status": "ok"})
        if engine.error is not None:
            return JSONResponse({"status": "dead", "error": repr(engine.error)}, status_code=503)
        return JSONResponse({"status": "shutting down"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = served.metrics.render()
        return Response(body, media_type=content_type)

    def reply(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def on_api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return reply(e)

    @app.exception_handler(RequestError)
    async def on_request_error(_: HTTPRequest, e: RequestError) -> JSONResponse:
        return reply(request_error(e))

    @app.exception_handler(Overloaded)
    async def on_overloaded(_: HTTPRequest, e: Overloaded) -> JSONResponse:
        return reply(APIError(429, str(e), type="rate_limit_error", code="overloaded"))

    @app.exception_handler(EngineUnavailable)
    async def on_unavailable(_: HTTPRequest, e: EngineUnavailable) -> JSONResponse:
        return reply(APIError(503, str(e), type="service_unavailable"))

    @app.exception_handler(ClientDisconnected)
    async def on_gone(_: HTTPRequest, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e.errors())
        return reply(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def on_http(_: HTTPRequest, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    return app
