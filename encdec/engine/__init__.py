"""In-flight batching engine: fixed decode slots, jitted static-shape steps, dual paged KV cache.

- :class:`Engine` (``engine.py``): the synchronous API; :class:`TokenStream` (``stream.py``) from ``stream``;
- :class:`AsyncEngine` (``async_engine.py``): one thread runs an engine's loop; threads and asyncio
  tasks submit and stream (:class:`RequestStream`, ``request_stream.py``);
- :class:`EngineConfig` (``config.py``): shapes and policies, every field checked;
- :class:`Request`, :class:`RequestOutput`, :class:`RequestError` (``request.py``);
- :class:`FrontEnd`, :class:`TextFrontEnd` (``frontend.py``): requests to encoder inputs;
- :class:`Scheduler` (``scheduler.py``): admission, pages and dispatch length, plain Python;
- ``steps.py``: the typed device state (:class:`SlotParams`) and the jitted steps.
"""

from encdec.engine.async_engine import AsyncEngine, Overloaded
from encdec.engine.config import EngineConfig
from encdec.engine.engine import Engine
from encdec.engine.frontend import FrontEnd, Prepared, TextFrontEnd
from encdec.engine.request import FinishReason, Request, RequestError, RequestOutput
from encdec.engine.request_stream import Delta, RequestStream
from encdec.engine.scheduler import Plan, Scheduler
from encdec.engine.stats import EngineStats
from encdec.engine.steps import SlotParams, clear_compiled
from encdec.engine.stream import TokenStream

__all__ = [
    "AsyncEngine",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "FrontEnd",
    "Overloaded",
    "Plan",
    "Prepared",
    "Request",
    "RequestError",
    "RequestOutput",
    "RequestStream",
    "Scheduler",
    "SlotParams",
    "clear_compiled",
    "TextFrontEnd",
    "TokenStream",
]
