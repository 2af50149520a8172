"""Beam search of 3 beams (a group fills most of a data shard's 4 slots) on a (2, 4) mesh gives the
single-device engine's n-best lists: tokens, order, finish reasons and scores."""

import numpy as np
import pytest

from encdec.engine import Engine, EngineConfig, Request


def _config(mesh_shape) -> EngineConfig:
    return EngineConfig(
        num_slots=8, page_size=4, max_encoder_len=16, encoder_buckets=(16,), max_new_tokens=8,
        max_encoder_batch=2, steps_per_dispatch=4, max_num_beams=3, max_logprobs=0, mesh_shape=mesh_shape,
    )


def _requests() -> list[Request]:
    rng = np.random.default_rng(5)
    inputs = [rng.integers(3, 90, int(rng.integers(3, 16))).tolist() for _ in range(3)]
    return [
        Request(inputs[0], max_new_tokens=8, num_beams=3, num_return_sequences=3),
        Request(inputs[1], max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.5),
        Request(inputs[2], max_new_tokens=8, num_beams=3, early_stopping=True),
        Request(inputs[1], max_new_tokens=8),  # greedy beside them, sharing request 1's cross pages
    ]


def test_beams_on_a_mesh_equal_single_device(models):
    model = models["t5"]
    expected = Engine(model, _config(None)).generate(_requests())
    engine = Engine(model, _config((2, 4)))
    outputs = engine.generate(_requests())
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out.finish_reason == ref.finish_reason != "error", (i, out.error)
        assert [s.token_ids for s in out.sequences] == [s.token_ids for s in ref.sequences], i
        for ours, theirs in zip(out.sequences, ref.sequences, strict=True):
            assert ours.finish_reason == theirs.finish_reason
            if theirs.score is not None:  # beams' scores (greedy has none)
                assert ours.score == pytest.approx(theirs.score, rel=1e-5, abs=1e-5)
    assert [len(o.sequences) for o in outputs] == [3, 2, 1, 1]
    stats = engine.stats()
    assert (stats.self_pages_used, stats.cross_pages_used, stats.tracked_requests) == (0, 0, 0)
    engine.self_alloc.check_invariants()
    engine.cross_alloc.check_invariants()
