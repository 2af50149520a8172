"""OpenAI-compatible HTTP serving over the asynchronous engine (``encdec serve``).

- :mod:`encdec.serving.app`: the FastAPI app (completions, audio transcriptions and
  translations, models, health, metrics) and its error bodies;
- :mod:`encdec.serving.models`: the served base model and its LoRA adapters by name;
- :mod:`encdec.serving.completions`, :mod:`encdec.serving.transcriptions`: the handlers;
- :mod:`encdec.serving.formats`: transcription segments as json / text / srt / vtt / verbose_json;
- :mod:`encdec.serving.metrics`: Prometheus figures;
- :mod:`encdec.serving.server`: uvicorn, ``encdec serve``, :class:`ServerThread` for tests.

The engine loop itself is :class:`encdec.engine.AsyncEngine`.
"""

from encdec.serving.app import build_app
from encdec.serving.formats import Segment, render
from encdec.serving.models import ServedModel, serve_model
from encdec.serving.server import ServerThread, serve_cli

__all__ = ["Segment", "ServedModel", "ServerThread", "build_app", "render", "serve_cli", "serve_model"]
