"""In-flight batching engine: fixed decode slots, jitted static-shape steps, dual paged KV cache.

- :class:`Engine` (``engine.py``): the synchronous API; :class:`TokenStream` (``stream.py``) from ``stream``;
- :class:`EngineConfig` (``config.py``): shapes and policies, every field checked;
- :class:`Request`, :class:`RequestOutput`, :class:`RequestError` (``request.py``);
- :class:`FrontEnd`, :class:`TextFrontEnd` (``frontend.py``): requests to encoder inputs;
- :class:`Scheduler` (``scheduler.py``): admission, pages and dispatch length, plain Python;
- ``steps.py``: the typed device state (:class:`SlotParams`) and the jitted steps.
"""

from encdec.engine.config import EngineConfig
from encdec.engine.engine import Engine
from encdec.engine.frontend import FrontEnd, Prepared, TextFrontEnd
from encdec.engine.request import FinishReason, Request, RequestError, RequestOutput
from encdec.engine.scheduler import Plan, Scheduler
from encdec.engine.stats import EngineStats
from encdec.engine.steps import SlotParams
from encdec.engine.stream import TokenStream

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "FrontEnd",
    "Plan",
    "Prepared",
    "Request",
    "RequestError",
    "RequestOutput",
    "Scheduler",
    "SlotParams",
    "TextFrontEnd",
    "TokenStream",
]
