"""``POST /v1/completions``: prompts in, text out, whole or as server-sent events.

Each prompt is one engine request; its deltas come from the engine's stream (incrementally
detokenized) and pass through :class:`StopText`, which cuts the text before the first stop
string and cancels the request there. A streamed and a non-streamed completion take the same
path, so they return the same text. A client that disconnects has its requests cancelled:
a stream when Starlette cancels the response (or its next write fails), a non-streamed request
when :func:`until_disconnected` sees the ``http.disconnect`` message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from encdec.engine import Request, RequestOutput, RequestStream
from encdec.engine.async_engine import EngineClosed, EngineUnavailable
from encdec.serving.models import ServedModel
from encdec.serving.protocol import (
    APIError,
    CompletionRequest,
    completion_body,
    completion_choice,
    error_body,
    new_id,
    now,
    usage,
)

T = TypeVar("T")
Event = tuple[int, str, str | None]
"""``(choice index, new text, finish reason or None)``."""


class StopText:
    """One choice's text with OpenAI's stop strings: the text ends before the first one.

    The tail that could still begin a stop string (its longest length minus one character) is
    held back until the next delta or the end, so no text after a stop string is ever sent.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._tail = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``text`` that is safe to send now."""
        if self.stopped or not text:
            return ""
        buffer = self._tail + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._tail = True, ""
            return buffer[: min(hits)]
        cut = max(0, len(buffer) - self._hold)
        self._tail = buffer[cut:]
        return buffer[:cut]

    def flush(self) -> str:
        """The held-back tail, at the end of the request."""
        tail, self._tail = self._tail, ""
        return tail


def engine_request(body: CompletionRequest, prompt: str | list[int], adapter_id: str | None) -> Request:
    """The engine request of one prompt; the engine checks every value."""
    return Request(
        inputs=prompt,
        max_new_tokens=body.max_tokens,
        min_new_tokens=0 if body.min_tokens is None else body.min_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        adapter_id=adapter_id,
    )


def finish_reason(output: RequestOutput) -> str:
    if output.finish_reason == "error":
        raise APIError(500, f"the request failed: {output.error}", type="server_error")
    if output.finish_reason == "cancelled":
        raise EngineClosed("the request was cancelled: the server is shutting down")
    return output.finish_reason


async def choice_events(index: int, stream: RequestStream, stops: Sequence[str]) -> AsyncIterator[Event]:
    """A choice's text pieces; the last event carries its finish reason."""
    stop = StopText(stops)
    async for delta in stream:
        text = stop.feed(delta.text)
        if stop.stopped:
            stream.cancel()
            yield index, text, "stop"
            return
        if delta.output is not None:
            yield index, text + stop.flush(), finish_reason(delta.output)
            return
        if text:
            yield index, text, None


async def merged(sources: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators as they come (one iterator: as is)."""
    if len(sources) == 1:
        async for item in sources[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except Exception as e:  # noqa: BLE001 - raised to the consumer below
            queue.put_nowait(e)
        finally:
            queue.put_nowait(end)

    tasks = [asyncio.create_task(pump(s)) for s in sources]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def until_disconnected(request: HTTPRequest) -> None:
    """Returns when the client has gone (the body has been read: only ``http.disconnect`` is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client left before its answer was ready (its requests are cancelled; nobody reads a reply)."""


async def unless_disconnected(
    request: HTTPRequest, work: Awaitable[T], on_disconnect: Callable[[], None]
) -> T:
    """``await work``, but if the client disconnects first call ``on_disconnect`` and raise
    :class:`ClientDisconnected`."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        on_disconnect()
        task.cancel()
        raise ClientDisconnected()
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


async def create_completion(served: ServedModel, body: CompletionRequest, http: HTTPRequest) -> Response:
    adapter_id = served.resolve(body.model)
    if served.is_audio:
        raise APIError(
            400, f"{body.model!r} is a speech-recognition model: use /v1/audio/transcriptions", param="model"
        )
    bad = body.unsupported()
    if bad is not None:
        raise APIError(400, f"{bad[0]}: {bad[1]}", param=bad[0])
    if served.model.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: the completions API returns text", param="model")
    prompts, stops = body.prompts(), body.stops()
    streams: list[RequestStream] = []
    try:
        for prompt in prompts:
            request = engine_request(body, prompt, adapter_id)
            streams.append(await served.engine.submit_async(request, decode=served.decode))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    cid, created = new_id("cmpl"), now()
    events = merged([choice_events(i, s, stops) for i, s in enumerate(streams)])

    def cancel_all() -> None:
        for s in streams:
            s.cancel()

    def usage_of() -> dict[str, int]:
        return usage(sum(s.prompt_tokens for s in streams), sum(len(s.token_ids) for s in streams))

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        sse = _sse(events, cid, created, body.model, usage_of if include_usage else None, cancel_all)
        return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect() -> list[dict[str, Any]]:
        texts, reasons = [""] * len(streams), [None] * len(streams)
        async for index, text, reason in events:
            texts[index] += text
            reasons[index] = reason or reasons[index]
        return [completion_choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]

    try:
        choices = await unless_disconnected(http, collect(), cancel_all)
    finally:
        cancel_all()
    return JSONResponse(completion_body(cid, created, body.model, choices, usage_of()))


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(
    events: AsyncIterator[Event],
    cid: str,
    created: int,
    model: str,
    usage_of: Callable[[], dict[str, int]] | None,
    cancel_all: Callable[[], None],
) -> AsyncIterator[str]:
    """OpenAI's chunks, ``data: [DONE]`` last; an error after the headers went out is one
    ``data: {"error": ...}`` event. Ending early (the client left) cancels the requests."""
    try:
        try:
            async for index, text, reason in events:
                yield _data(
                    completion_body(cid, created, model, [completion_choice(index, text, reason)], None)
                )
            if usage_of is not None:
                yield _data(completion_body(cid, created, model, [], usage_of()))
        except APIError as e:
            yield _data(e.body())
        except EngineUnavailable as e:
            yield _data(error_body(str(e), "service_unavailable"))
        yield "data: [DONE]\n\n"
    finally:
        cancel_all()
