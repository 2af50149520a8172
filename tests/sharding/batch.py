"""The engine config and the mixed batch every sharding test serves (light: no torch import,
so the multi-host worker processes start quickly)."""

from __future__ import annotations

import dataclasses

import numpy as np

from encdec.engine import EngineConfig, Request

MAX_NEW = 8


def engine_config(family: str, mesh_shape) -> EngineConfig:
    whisper = family == "whisper"
    return EngineConfig(
        num_slots=16,  # 2 per data shard on an (8, 1) mesh: room for a beam pair
        page_size=4 if not whisper else 16,
        max_encoder_len=16,
        encoder_buckets=(16,),
        max_new_tokens=MAX_NEW,
        max_encoder_batch=2,
        max_encoder_tokens=2 * 1500,
        steps_per_dispatch=4,
        max_num_beams=2,
        max_logprobs=0,
        mesh_shape=mesh_shape,
    )


def requests(family: str) -> list[Request]:
    rng = np.random.default_rng(3)
    if family == "whisper":
        from encdec.whisper import AudioInput
        from tests.whisper.test_transcribe import _tone

        clips = [(1.0, 300), (2.0, 900), (0.5, 2000)]
        inputs = [AudioInput(_tone(s, f, i)) for i, (s, f) in enumerate(clips)]
    else:
        inputs = [rng.integers(3, 90, int(rng.integers(2, 16))).tolist() for _ in range(3)]
    out = [Request(x, max_new_tokens=MAX_NEW) for x in inputs]
    out.append(Request(inputs[0], max_new_tokens=MAX_NEW, temperature=1.0, seed=7, num_return_sequences=2))
    out.append(Request(inputs[1], max_new_tokens=MAX_NEW, num_beams=2, num_return_sequences=2))
    if family == "t5":
        out += [dataclasses.replace(r, adapter_id="a") for r in out[:2]]
    return out
