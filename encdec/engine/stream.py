"""``TokenStream``: one request's tokens as the engine produces them (``Engine.stream``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from encdec.engine.request import RequestOutput

if TYPE_CHECKING:
    from encdec.engine.engine import Engine


class TokenStream(Iterator[int]):
    """A request's tokens as they are produced (:meth:`Engine.stream`).

    Each ``next`` runs engine steps until a token is out. When the last token has been yielded
    the engine forgets the request (its :attr:`output` stays here); closing the stream early, or
    dropping it, cancels the request and frees its slot and pages.
    """

    def __init__(self, engine: Engine, handle: int):
        self.engine = engine
        self.handle = handle
        self.output: RequestOutput | None = None
        """The request's output, once it has ended."""
        self._tracked = engine._tracked[handle]
        self._sent = 0

    def __next__(self) -> int:
        tracked = self._tracked
        if tracked is None:
            raise StopIteration
        while True:
            if self._sent < len(tracked.tokens):
                self._sent += 1
                return tracked.tokens[self._sent - 1]
            if tracked.output is not None:
                self.close()
                raise StopIteration
            if not self.engine.step() and tracked.output is None and self._sent == len(tracked.tokens):
                raise RuntimeError("engine idle while a streamed request is unfinished")

    def close(self) -> None:
        """Stop here: cancels the request if it is still running; the engine forgets it."""
        if self._tracked is not None:
            self._tracked = None
            self.output = self.engine._forget(self.handle) or self.output

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer (interpreter shutdown)
            pass
