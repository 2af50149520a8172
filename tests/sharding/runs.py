"""One engine run per (family, mesh shape), shared by this folder's tests (compiles are the cost).

Each run serves the same mixed batch: greedy requests, seeded samples (two per request), beam
search with an n-best list and, for T5, requests through LoRA adapters. The single-device engine
(no mesh at all) runs the same batch once per family: the reference every mesh must equal.
"""

from __future__ import annotations

import jax
import numpy as np

import encdec
from encdec.engine import Engine
from encdec.lora import AdapterBank, LoraConfig, init_lora
from encdec.whisper import whisper_engine
from tests.sharding.batch import engine_config, requests
from tests.tiny_models import ENGINE_OVERRIDES, save_hf_model

T5_CONFIG = {**ENGINE_OVERRIDES["t5"], "vocab_size": 99}
"""A vocabulary no model axis here divides (like BART's 50,265): its matrices split the width."""
LORA_TARGETS = ("q", "v", "o", "wi", "wo")


_ADAPTERS: dict = {}


def adapter(model, seed: int):
    """A random adapter with nonzero B (a fresh one changes nothing), made once per model."""
    if (id(model), seed) not in _ADAPTERS:
        config = LoraConfig(rank=2, target_modules=LORA_TARGETS)
        lora = init_lora(jax.random.PRNGKey(seed), model.params, model.config, config)
        rng = np.random.default_rng(seed)
        _ADAPTERS[id(model), seed] = jax.tree.map(
            lambda x: (rng.standard_normal(x.shape) * 0.5).astype(np.float32) if x.ndim >= 2 else x, lora
        )
    return _ADAPTERS[id(model), seed]


def models(root, whisper_dir) -> dict:
    """The tiny T5 (vocabulary 99), BART and Whisper, loaded on one device."""
    out = {}
    for family in ("t5", "bart"):
        d = root / family
        save_hf_model(family, d, config=T5_CONFIG if family == "t5" else ENGINE_OVERRIDES[family])
        out[family] = encdec.load_pretrained(d)
    if whisper_dir is not None:
        out["whisper"] = encdec.load_pretrained(whisper_dir)
    return out


_RUNS: dict = {}


def run(model, family: str, mesh_shape) -> tuple[Engine, list]:
    """The engine of ``mesh_shape`` (None: one device, no mesh) and its outputs, computed once."""
    key = (family, mesh_shape)
    if key not in _RUNS:
        config = engine_config(family, mesh_shape)
        if family == "whisper":
            engine = whisper_engine(model, config)
        else:
            bank = None
            if family == "t5":
                bank = AdapterBank(
                    model.params, model.config, capacity=1, max_rank=2, target_modules=LORA_TARGETS
                )
            engine = Engine(model, config, adapters=bank)
            if bank is not None:
                engine.load_adapter("a", adapter(model, 1))
        _RUNS[key] = (engine, engine.generate(requests(family)))
    return _RUNS[key]
