"""Running the app with uvicorn: ``encdec serve`` (:func:`serve_cli`) and :class:`ServerThread`
(a server on a background thread, for tests and the load benchmark).

The server binds 127.0.0.1 unless told otherwise. On shutdown uvicorn stops accepting
connections and gives open requests a few seconds to finish; then the engine is shut down
(cancelling what is left, freeing its slots and pages).
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI

from encdec.checkpoints.pretrained import Model
from encdec.engine import EngineConfig
from encdec.serving.app import build_app
from encdec.serving.models import ServedModel, serve_model
from encdec.whisper.options import LongFormOptions
from encdec.whisper.serving import whisper_engine_config

GRACEFUL_SECONDS = 5
"""How long open requests may run on after a shutdown signal before uvicorn cancels them."""


class ServerThread:
    """``app`` served by uvicorn on a background thread, on ``host:port`` (port 0: a free one)."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level=self.log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="encdec-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None and self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def engine_config(model: Model, *, num_slots: int | None, options: Mapping[str, Any]) -> EngineConfig:
    """The engine config of ``encdec serve``: the engine's defaults (Whisper's for audio
    models), ``--num-slots``, then ``--engine KEY=VALUE`` options."""
    fields = dict(options)
    if num_slots is not None:
        fields["num_slots"] = num_slots
    try:
        if model.config.is_audio:
            # Prompts as long as encdec transcribe's fit (a request's text prompt, previous text):
            # each slot's self pages hold 448 positions rather than 227 (Whisper-base: 28 pages of
            # 16, not 15). --engine max_decoder_prefix=4 gives that back and refuses prompts.
            prompt_len = LongFormOptions(timestamps=False).prefix_len(model.config.max_positions)
            base = whisper_engine_config(model, num_slots=fields.pop("num_slots", 16), prompt_len=prompt_len)
            return dataclasses.replace(base, **fields)
        return EngineConfig(**fields)
    except TypeError as e:
        raise ValueError(f"--engine: {e}") from None


def parse_pairs(pairs: Sequence[str], flag: str, *, yaml_values: bool = False) -> dict[str, Any]:
    """``KEY=VALUE`` arguments as a dict (values parsed as YAML when asked)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        if key in out:
            raise ValueError(f"{flag}: {key!r} is given twice")
        out[key] = yaml.safe_load(value) if yaml_values else value
    return out


def serve_cli(
    model_dir: str | Path | None,
    *,
    name: str | None,
    adapters: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    num_slots: int | None = None,
    engine_options: Sequence[str] = (),
    max_pending: int = 256,
    dtype: str = "float32",
    quantize: str | None = None,
    warmup: bool = True,
    log_level: str = "info",
) -> int:
    """``encdec serve``: load the model (``whisper-base``: fetched into the cache), its adapters,
    compile, and serve until interrupted."""
    import encdec
    from encdec.whisper.transcribe import load_whisper

    if model_dir is None:
        raise ValueError("--model is required")
    if str(model_dir) == "whisper-base":
        model = load_whisper(None, dtype=dtype, quantize=quantize)
    else:
        model = encdec.load_pretrained(model_dir, dtype=dtype, quantize=quantize)
    name = name or Path(str(model_dir)).name
    options = parse_pairs(engine_options, "--engine", yaml_values=True)
    config = engine_config(model, num_slots=num_slots, options=options)
    kind = f"{model.config.model_type}, {config.num_slots} slots"
    print(f"encdec serve: loading adapters and compiling {name} ({kind})...", file=sys.stderr)
    start = time.perf_counter()
    served: ServedModel = serve_model(
        model,
        name=name,
        config=config,
        adapters=parse_pairs(adapters, "--adapter"),
        max_pending=max_pending,
        warmup=warmup,
    )
    served_names = ", ".join([served.name, *served.adapter_ids])
    print(
        f"encdec serve: ready in {time.perf_counter() - start:.1f} s; models: {served_names}", file=sys.stderr
    )
    app = build_app(served, api_key=api_key)
    try:
        uvicorn.run(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SECONDS
        )
    finally:
        served.engine.shutdown(drain=False)
    return 0
