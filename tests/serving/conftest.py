"""Fixtures of the serving tests: a tiny T5 with a tokenizer (the ``tiny-t5`` bench shape:
random weights, sentencepiece-style pieces ``▁t0 ... ▁t511``), the tiny random Whisper, and
engine configs small enough for CPU."""

import pytest

import encdec
from encdec.bench.shapes import write_shape
from encdec.engine import Engine, EngineConfig
from encdec.lora import AdapterBank
from tests.whisper.fixtures import (  # noqa: F401 (the Whisper fixtures)
    espeak_clips,
    tiny_ct2_dir,
    tiny_hf_model,
    whisper_base_path,
)

MAX_NEW = 16


def text_config(**kw) -> EngineConfig:
    base = dict(
        num_slots=4,
        page_size=4,
        max_encoder_len=32,
        encoder_buckets=(16, 32),
        max_new_tokens=MAX_NEW,
        steps_per_dispatch=2,
        max_encoder_batch=4,
    )
    return EngineConfig(**{**base, **kw})


def adapter_bank(model) -> AdapterBank:
    """The bank the test server builds for its one adapter (rank 2 on q and v)."""
    return AdapterBank(model.params, model.config, capacity=1, max_rank=2, target_modules=("q", "v"))


def text_engine(model, **config) -> Engine:
    """An engine of the test server's shapes (its adapter bank included), so every engine of
    these tests shares one set of compiled steps."""
    return Engine(model, text_config(**config), adapters=adapter_bank(model))


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    return write_shape("tiny-t5", cache_dir=tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def text_model(text_model_dir):
    return encdec.load_pretrained(text_model_dir)
