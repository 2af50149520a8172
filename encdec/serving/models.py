"""What a server serves: one base model on an :class:`AsyncEngine`, and its LoRA adapters by name.

A request's ``model`` names the base model (its served name) or one of the adapters loaded
with ``--adapter NAME=DIR`` (PEFT directories, as vLLM's ``--lora-modules``); the adapters
share the engine through its adapter bank, one per request.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from encdec.checkpoints.pretrained import Model
from encdec.engine import AsyncEngine, Engine, EngineConfig
from encdec.lora.bank import AdapterBank
from encdec.lora.peft import load_peft
from encdec.serving.metrics import ServerMetrics
from encdec.serving.protocol import APIError
from encdec.whisper.serving import whisper_engine


@dataclasses.dataclass
class ServedModel:
    """The served base model's name and its running engine."""

    name: str
    engine: AsyncEngine
    metrics: ServerMetrics = dataclasses.field(default_factory=ServerMetrics)
    """Fed by the engine's ``on_finish`` hook (:func:`serve_model` connects them)."""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.metrics.watch(self.engine.snapshot)

    @property
    def model(self) -> Model:
        return self.engine.engine.model

    @property
    def is_audio(self) -> bool:
        return self.model.config.is_audio

    @property
    def adapter_ids(self) -> list[str]:
        bank = self.engine.engine.adapters
        return [] if bank is None else bank.adapter_ids

    def resolve(self, requested: str) -> str | None:
        """The adapter id a request's ``model`` selects (None: the base model); 404 if unknown."""
        if requested == self.name:
            return None
        if requested in self.adapter_ids:
            return requested
        served = ", ".join(repr(m) for m in [self.name, *self.adapter_ids])
        raise APIError(
            404,
            f"the model {requested!r} does not exist; this server serves {served}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )

    def decode(self, token_ids: Sequence[int]) -> str | None:
        """Output text of a text model (token-id prompts too); None without a tokenizer."""
        tokenizer = self.model.tokenizer
        return None if tokenizer is None else tokenizer.decode(list(token_ids), skip_special_tokens=True)


def adapter_bank(model: Model, adapters: Mapping[str, str | Path]) -> tuple[AdapterBank, dict[str, Any]]:
    """A bank sized for ``adapters`` (name -> PEFT directory) and their trees, read and checked."""
    loras = {name: load_peft(path, model.params, model.config)[0] for name, path in adapters.items()}
    bank = AdapterBank.for_adapters(model.params, model.config, list(loras.values()))
    return bank, loras


def serve_model(
    model: Model,
    *,
    name: str,
    config: EngineConfig | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    max_pending: int = 256,
    warmup: bool = True,
) -> ServedModel:
    """Build the engine for ``model`` (Whisper's front end for audio models), load the
    adapters, compile every step (``warmup``) and start its loop."""
    if adapters and name in adapters:
        raise ValueError(f"adapter name {name!r} is the base model's served name")
    bank, loras = adapter_bank(model, adapters) if adapters else (None, {})
    if model.config.is_audio:
        engine = whisper_engine(model, config, adapters=bank)
    else:
        engine = Engine(model, config, adapters=bank)
    for adapter_id, lora in loras.items():
        engine.load_adapter(adapter_id, lora)
    if warmup:
        engine.warmup()
    return serve_engine(engine, name=name, max_pending=max_pending)


def serve_engine(engine: Engine, *, name: str, max_pending: int = 256) -> ServedModel:
    """Start ``engine``'s loop (nothing else may drive it from now on) with metrics attached."""
    metrics = ServerMetrics()
    return ServedModel(name, AsyncEngine(engine, max_pending=max_pending, on_finish=metrics.observe), metrics)
