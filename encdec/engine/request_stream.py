"""One request's stream out of the :class:`~encdec.engine.async_engine.AsyncEngine`: the
channel the loop thread fills and the consumer's side that detokenizes and iterates it.

A channel carries :data:`ACCEPTED` (or a :class:`Failed`) first, then one :class:`Chunk` per
round that produced tokens, the last one with the request's output. A thread reads a
:class:`ThreadChannel` (blocking); an asyncio task reads an :class:`AsyncChannel`, which the
loop fills with ``call_soon_threadsafe`` (it raises once the task's event loop has closed,
and the loop then cancels the request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from typing import Any, Protocol

from encdec.engine.detokenizer import Decode, IncrementalDetokenizer
from encdec.engine.request import RequestOutput


class _Canceller(Protocol):
    def cancel(self, handle: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class SequenceDelta:
    """New tokens of one of a request's sequences (its samples, or its beams once found)."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] = ()
    """Each new token's log-probability (when the request asked for them)."""
    top_logprobs: tuple[dict[int, float], ...] = ()
    """The most likely tokens at each new step (``Request.logprobs`` > 0, not for beams)."""


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one loop round produced for a request: new tokens and the text they complete.

    ``token_ids`` and ``text`` are the first sequence's; ``sequences`` holds every sequence
    with something new (the first included), for requests of several samples or beams. Beams
    arrive whole on the last delta: the search knows its best hypotheses only at its end.
    """

    token_ids: tuple[int, ...]
    text: str
    output: RequestOutput | None = None
    """The request's output, on its last delta only (finish reason, timings, every token)."""
    sequences: tuple[SequenceDelta, ...] = ()


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What the loop hands a channel after a round: each sequence's new tokens (``(index,
    tokens, logprobs, top logprobs)``), and the output if the request ended."""

    sequences: tuple[tuple[int, tuple[int, ...], tuple[float, ...], tuple[dict[int, float], ...]], ...]
    output: RequestOutput | None


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request (or the whole loop) failed: raised to the consumer."""

    error: BaseException


ACCEPTED = object()
"""First item of a channel whose request the engine has queued."""


class ThreadChannel:
    """Items for a consumer thread."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def get(self) -> Any:
        return self._queue.get()


class AsyncChannel:
    """Items for a consumer asyncio task, put from another thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)  # RuntimeError once it closed

    async def get(self) -> Any:
        return await self._queue.get()


class RequestStream:
    """One request's :class:`Delta` s in order; the last one carries its output.

    From ``AsyncEngine.submit`` iterate it (blocking); from ``AsyncEngine.submit_async``
    ``async for`` it. :meth:`cancel` (or dropping it unfinished) cancels the request; it then
    ends with ``finish_reason="cancelled"``. If the loop dies, iterating raises ``EngineDead``.
    """

    def __init__(
        self,
        owner: _Canceller,
        handle: int,
        channel: ThreadChannel | AsyncChannel,
        decode: Decode,
        prompt_tokens: int,
    ):
        self.handle = handle
        self.prompt_tokens = prompt_tokens
        """Encoder positions of the request (prompt tokens, for usage figures)."""
        self.output: RequestOutput | None = None
        """The request's output, once it has ended."""
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        """One per sequence that has produced tokens, by index."""
        self._decode = decode
        self._owner, self._channel = owner, channel
        self._done = False

    def _detokenizer(self, index: int) -> IncrementalDetokenizer:
        if index not in self.detokenizers:
            self.detokenizers[index] = IncrementalDetokenizer(self._decode)
        return self.detokenizers[index]

    @property
    def text(self) -> str:
        """The first sequence's text so far."""
        return self._detokenizer(0).text

    @property
    def token_ids(self) -> list[int]:
        """The first sequence's tokens so far."""
        return self._detokenizer(0).token_ids

    @property
    def num_tokens(self) -> int:
        """Tokens generated so far over every sequence."""
        return sum(len(d.token_ids) for d in self.detokenizers.values())

    def wait_accepted(self) -> None:
        """Block until the engine has queued the request (raises why it did not)."""
        self._accept(self._channel.get())

    async def wait_accepted_async(self) -> None:
        self._accept(await self._channel.get())

    def _accept(self, item: Any) -> None:
        if item is not ACCEPTED:
            self._done = True
            raise item.error

    def _next(self, item: Any) -> Delta:
        if isinstance(item, Failed):
            self._done = True
            raise item.error
        texts = {index: self._detokenizer(index).add(ids) for index, ids, _, _ in item.sequences}
        if item.output is not None:
            for index in range(max(1, len(item.output.sequences))):
                texts[index] = texts.get(index, "") + self._detokenizer(index).finish()
            self.output, self._done = item.output, True
        news = {index: (ids, lps, top) for index, ids, lps, top in item.sequences}
        sequences = []
        for index, text in sorted(texts.items()):
            ids, lps, top = news.get(index, ((), (), ()))
            sequences.append(SequenceDelta(index, ids, text, lps, top))
        return Delta(news.get(0, ((),))[0], texts.get(0, ""), item.output, tuple(sequences))

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Delta:
        if not isinstance(self._channel, ThreadChannel):
            raise TypeError("a stream from submit_async() is iterated with `async for`")
        if self._done:
            raise StopIteration
        return self._next(self._channel.get())

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if not isinstance(self._channel, AsyncChannel):
            raise TypeError("a stream from submit() is iterated with a plain `for`")
        if self._done:
            raise StopAsyncIteration
        return self._next(await self._channel.get())

    def result(self) -> RequestOutput:
        """Iterate to the end (thread API) and return the output."""
        for _ in self:
            pass
        assert self.output is not None
        return self.output

    def cancel(self) -> None:
        """Cancel the request unless it has ended (the stream then ends with ``cancelled``)."""
        if not self._done:
            self._owner.cancel(self.handle)

    def __del__(self):
        try:
            self.cancel()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
