"""``AsyncEngine``: one thread owns an :class:`Engine` and runs its loop; any thread or asyncio
task submits, streams, cancels, and loads or unloads adapters.

In-flight batching needs ``Engine.step`` driven without pause, and each caller that drives it
(``generate``, ``stream``) serves only its own requests; callers sharing the engine's lock take
turns, and a waiting thread can starve while the driver re-takes the lock between steps. So
here one thread calls ``step`` and nothing else touches the engine: callers post operations
(submit, cancel, a call such as loading an adapter) to an inbox the loop drains between rounds,
and each request's tokens come back through its own channel (a queue for a thread, an asyncio
queue fed with ``call_soon_threadsafe`` for a task). The loop sleeps on a condition when it
has nothing to do.

A request is checked and prepared in the caller (the field rules, then the front end:
tokenizing, reading audio), so a bad request fails its caller at once and front-end work never
stalls the decode loop. At most ``max_pending`` requests may be between submit and their last
token; one more raises :class:`Overloaded`. Text deltas are detokenized in the consumer
(:class:`~encdec.engine.detokenizer.IncrementalDetokenizer`), not on the loop.

An operation that fails (a request that can never fit, a consumer whose event loop has closed)
fails alone. If ``Engine.step`` raises, the engine's state is unknown: the loop stops, every
waiting stream and call gets :class:`EngineDead` with the cause, and later calls raise it at
once. ``shutdown(drain=True)`` refuses new requests and finishes the running ones;
``drain=False`` (or a drain that outlives its timeout) cancels them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from encdec.engine.detokenizer import Decode
from encdec.engine.engine import Engine
from encdec.engine.frontend import Prepared
from encdec.engine.request import Request, RequestOutput, checked_request
from encdec.engine.request_stream import (
    ACCEPTED,
    AsyncChannel,
    Chunk,
    Delta,
    Failed,
    RequestStream,
    SequenceDelta,
    ThreadChannel,
)

__all__ = [
    "AsyncEngine",
    "Delta",
    "EngineClosed",
    "EngineDead",
    "EngineUnavailable",
    "LoadSnapshot",
    "Overloaded",
    "RequestStream",
    "SequenceDelta",
]

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The engine holds ``max_pending`` unfinished requests already; retry later (HTTP 429)."""


class EngineUnavailable(RuntimeError):
    """The engine serves no more requests (HTTP 503)."""


class EngineDead(EngineUnavailable):
    """The engine loop stopped on an error; the message names it."""


class EngineClosed(EngineUnavailable):
    """The engine was shut down (or is draining)."""


@dataclasses.dataclass(frozen=True)
class LoadSnapshot:
    """The loop's figures after its latest round, read without waiting for it (metrics, health)."""

    alive: bool
    pending: int
    """Requests between submit and their last token."""
    queued: int
    """Requests waiting in the engine for a slot."""
    busy_slots: int
    num_slots: int
    self_pages_used: int
    self_pages_total: int
    cross_pages_used: int
    """Held by requests (cached idle pages not counted: ``cross_pages_cached``)."""
    cross_pages_total: int
    cross_pages_cached: int
    """Cross pages kept after their requests ended, for later requests with the same input."""
    tokens_generated: int
    """Tokens handed to consumers since the loop started."""
    finished: dict[str, int]
    """Requests ended since the loop started, by finish reason."""
    rounds: int


@dataclasses.dataclass
class _Submit:
    rid: int
    request: Request
    prepared: Prepared
    arrival: float
    channel: Any

    def fail(self, error: BaseException) -> None:
        self.channel.put(Failed(error))


@dataclasses.dataclass
class _Cancel:
    rid: int

    def fail(self, error: BaseException) -> None:
        pass


@dataclasses.dataclass
class _Call:
    fn: Callable[[Engine], Any]
    future: concurrent.futures.Future

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclasses.dataclass
class _Live:
    channel: Any
    sent: dict[int, int] = dataclasses.field(default_factory=dict)
    """Tokens handed over, by sequence index."""


class AsyncEngine:
    """Runs ``engine``'s loop on its own thread (started here); see the module doc.

    Nothing else may drive ``engine`` while this runs. ``on_finish`` is called on the loop
    thread with every request's output when it is handed over (metrics); it must be quick and
    its exceptions are logged and ignored.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_pending: int = 256,
        on_finish: Callable[[RequestOutput], None] | None = None,
        name: str = "encdec-engine",
    ):
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        self.engine = engine
        self.max_pending = max_pending
        self._on_finish = on_finish
        self._cond = threading.Condition()
        self._inbox: list[_Submit | _Cancel | _Call] = []
        self._pending = 0
        self._closing = False
        self._drain = True
        self._exited = False
        self._error: BaseException | None = None
        # Loop thread only:
        self._live: dict[int, _Live] = {}
        self._busy = False
        self._tokens = 0
        self._finished: collections.Counter[str] = collections.Counter()
        self._rounds = 0
        self._snapshot = self._make_snapshot(alive=True)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- requests in --------------------------------------------------------------------------

    def submit(self, request: Request, *, decode: Decode | None = None) -> RequestStream:
        """Check, prepare and queue a request; return its stream once the engine holds it.

        For threads: iterate the stream (blocking). Raises ``RequestError`` (bad request),
        :class:`Overloaded` or :class:`EngineUnavailable`. ``decode`` turns token ids into the
        deltas' text (default: the front end's ``text``).
        """
        stream = self._open(request, ThreadChannel(), decode)
        stream.wait_accepted()
        return stream

    async def submit_async(self, request: Request, *, decode: Decode | None = None) -> RequestStream:
        """:meth:`submit` for asyncio: preparing runs in a worker thread; ``async for`` the stream."""
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, self._open, request, AsyncChannel(loop), decode)
        try:
            stream = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the caller left while it was being prepared: drop it
            opening.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else f.result().cancel()
            )
            raise
        try:
            await stream.wait_accepted_async()
        except asyncio.CancelledError:
            stream.cancel()
            raise
        return stream

    async def generate(self, request: Request, *, decode: Decode | None = None) -> RequestOutput:
        """Run one request to its end (asyncio); cancelling the awaiting task cancels the request."""
        stream = await self.submit_async(request, decode=decode)
        try:
            async for _ in stream:
                pass
        finally:
            stream.cancel()
        assert stream.output is not None
        return stream.output

    def _open(self, request: Request, channel: Any, decode: Decode | None) -> RequestStream:
        arrival = time.perf_counter()
        self._check_open()
        checked = checked_request(request)
        prepared = self.engine._prepare(checked)  # the front end's work, in the caller's thread
        if decode is None:
            decode = functools.partial(self.engine.frontend.text, prepared)
        with self._cond:
            self._check_open()
            if self._pending >= self.max_pending:
                raise Overloaded(
                    f"the engine holds {self._pending} unfinished requests, its limit "
                    f"(max_pending={self.max_pending}); retry later"
                )
            rid = next(self.engine._handles)
            self._pending += 1
            self._inbox.append(_Submit(rid, checked, prepared, arrival, channel))
            self._cond.notify()
        return RequestStream(self, rid, channel, decode, prepared.encoder_len)

    def cancel(self, handle: int) -> None:
        """Stop a request: its stream ends with ``finish_reason="cancelled"`` and its slot and
        pages are freed; nothing happens if it has already finished."""
        with self._cond:
            if not self._exited:
                self._inbox.append(_Cancel(handle))
                self._cond.notify()

    # ---- calls on the loop thread ---------------------------------------------------------------

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the loop thread between two rounds; its result in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._exited:
                future.set_exception(self._unavailable())
            else:
                self._inbox.append(_Call(fn, future))
                self._cond.notify()
        return future

    async def run(self, fn: Callable[[Engine], Any]) -> Any:
        """:meth:`call` for asyncio."""
        return await asyncio.wrap_future(self.call(fn))

    def load_adapter(self, adapter_id: str, lora: Any, *, timeout: float | None = None) -> None:
        """``Engine.load_adapter`` between two rounds (blocks until done)."""
        self.call(lambda e: e.load_adapter(adapter_id, lora)).result(timeout)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        """``Engine.unload_adapter`` between two rounds; refused while a request uses it."""
        self.call(lambda e: e.unload_adapter(adapter_id)).result(timeout)

    def stats(self, *, timeout: float | None = None):
        """``Engine.stats()`` between two rounds (for figures without waiting: :meth:`snapshot`)."""
        return self.call(lambda e: e.stats()).result(timeout)

    def snapshot(self) -> LoadSnapshot:
        return self._snapshot

    # ---- state ----------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The loop runs and takes new requests."""
        return not (self._exited or self._closing or self._error is not None)

    @property
    def error(self) -> BaseException | None:
        """What stopped the loop, if it died."""
        return self._error

    def _check_open(self) -> None:
        if self._error is not None or self._exited or self._closing:
            raise self._unavailable()

    def _unavailable(self) -> EngineUnavailable:
        if self._error is not None:
            e = self._error
            return EngineDead(f"the engine loop stopped on an error: {type(e).__name__}: {e}")
        return EngineClosed("the engine is shut down" if self._exited else "the engine is shutting down")

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish the running ones (``drain``, for at most ``timeout``
        seconds) or cancel them; return when the loop has stopped."""
        with self._cond:
            self._closing = True
            self._drain = self._drain and drain
            self._cond.notify()
        self._thread.join(timeout if drain else None)
        if self._thread.is_alive():
            with self._cond:
                self._drain = False
                self._cond.notify()
            self._thread.join()

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(drain=False)

    # ---- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._busy or self._closing):
                        self._cond.wait()
                    inbox, self._inbox = self._inbox, []
                    closing, drain = self._closing, self._drain
                for op in inbox:
                    self._apply(op)
                if closing and not drain:
                    for rid in list(self._live):
                        self.engine.cancel(rid)
                self._busy = self.engine.step()
                self._rounds += 1
                self._deliver()
                self._snapshot = self._make_snapshot(alive=True)
                if closing and not self._live and not self._busy:
                    with self._cond:
                        if not self._inbox:
                            break
        except BaseException as e:  # noqa: BLE001 - reported to every waiter, not swallowed
            log.exception("the engine loop stopped")
            self._error = e
        finally:
            self._stopped()

    def _apply(self, op: _Submit | _Cancel | _Call) -> None:
        try:
            if isinstance(op, _Submit):
                self._start(op)
            elif isinstance(op, _Cancel):
                if op.rid in self._live:
                    self.engine.cancel(op.rid)
            else:
                op.future.set_result(op.fn(self.engine))
        except Exception as e:  # noqa: BLE001 - one operation's failure is its own
            try:
                op.fail(e)
            except Exception:  # noqa: BLE001 - its consumer is gone too
                log.warning("could not report a failed operation", exc_info=True)

    def _start(self, op: _Submit) -> None:
        try:
            self.engine._enqueue(op.rid, op.request, op.prepared, op.arrival)
        except Exception:
            self._release()
            raise
        self._live[op.rid] = live = _Live(op.channel)
        self._put(op.rid, live, ACCEPTED)

    def _deliver(self) -> None:
        """Hand every request's new tokens to its channel; outputs of ended requests with them."""
        tracked_by_rid = self.engine._tracked  # read on the only thread that changes it
        for rid, live in list(self._live.items()):
            tracked = tracked_by_rid.get(rid)
            if tracked is None:  # someone else drove the engine and took the output
                del self._live[rid]
                self._release()
                live.channel.put(Failed(RuntimeError(f"request {rid}: the engine no longer holds it")))
                continue
            with_logprobs = tracked.request.logprobs is not None
            news = []
            for index, seq in enumerate(tracked.seqs):
                sent, n = live.sent.get(index, 0), len(seq.tokens)
                if n > sent:
                    live.sent[index] = n
                    logprobs = tuple(seq.logprobs[sent:n]) if with_logprobs else ()
                    top = tuple(seq.top[sent:n]) if with_logprobs else ()
                    news.append((index, tuple(seq.tokens[sent:n]), logprobs, top))
                    self._tokens += n - sent
            if not news and tracked.output is None:
                continue
            output = None if tracked.output is None else self._hand_over(rid)
            self._put(rid, live, Chunk(tuple(news), output))

    def _hand_over(self, rid: int) -> RequestOutput:
        output = self.engine.result(rid)
        del self._live[rid]
        self._release()
        self._finished[output.finish_reason] += 1
        if self._on_finish is not None:
            try:
                self._on_finish(output)
            except Exception:  # noqa: BLE001 - a metrics hook never stops the loop
                log.warning("on_finish failed", exc_info=True)
        return output

    def _put(self, rid: int, live: _Live, item: Any) -> None:
        try:
            live.channel.put(item)
        except Exception:  # noqa: BLE001 - its consumer is gone (e.g. its event loop closed)
            log.warning("request %d: its consumer is gone; cancelling it", rid, exc_info=True)
            if rid in self._live:
                self.engine.cancel(rid)
                self._hand_over(rid)

    def _release(self) -> None:
        with self._cond:
            self._pending -= 1

    def _stopped(self) -> None:
        with self._cond:
            self._exited = True
            inbox, self._inbox = self._inbox, []
        for op in inbox:
            try:
                op.fail(self._unavailable())
            except Exception:  # noqa: BLE001
                pass
        for live in self._live.values():
            try:
                live.channel.put(Failed(self._unavailable()))
            except Exception:  # noqa: BLE001
                pass
        self._live.clear()
        with self._cond:
            self._pending = 0
        self._snapshot = self._make_snapshot(alive=False)

    def _make_snapshot(self, *, alive: bool) -> LoadSnapshot:
        e, s = self.engine, self.engine.scheduler
        return LoadSnapshot(
            alive=alive,
            pending=self._pending,
            queued=s.num_queued,
            busy_slots=s.busy_slots,
            num_slots=e.config.num_slots,
            self_pages_used=e.self_alloc.num_used,
            self_pages_total=e.self_alloc.capacity,
            cross_pages_used=e.cross_alloc.num_used - s.cross_cache.idle_pages,
            cross_pages_total=e.cross_alloc.capacity,
            cross_pages_cached=s.cross_cache.idle_pages,
            tokens_generated=self._tokens,
            finished=dict(self._finished),
            rounds=self._rounds,
        )
