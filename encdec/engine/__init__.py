"""In-flight batching engine: fixed decode slots, jitted static-shape steps, dual paged KV cache."""

from encdec.engine.config import EngineConfig
from encdec.engine.engine import Engine
from encdec.engine.request import AudioInput, Request, RequestError, RequestOutput

__all__ = ["AudioInput", "Engine", "EngineConfig", "Request", "RequestError", "RequestOutput"]
