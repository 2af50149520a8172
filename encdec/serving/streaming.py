"""What the HTTP handlers share about streams: stop strings over text deltas, merging several
requests' events, and noticing a client that has gone.

A client that disconnects has its requests cancelled: a streamed response when Starlette
cancels it (or its next write fails), a non-streamed one when :func:`until_disconnected` sees
the ``http.disconnect`` message while the handler waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request as HTTPRequest

T = TypeVar("T")


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def sse_data(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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
