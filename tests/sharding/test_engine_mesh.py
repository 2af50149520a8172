"""Every mesh shape gives the single-device engine's tokens: greedy, seeded samples, beams, LoRA
(T5 on all four shapes, BART and Whisper on two each: ``FAMILY_SHAPES``).

T5's vocabulary (99) divides no model axis here and its 4 heads do not divide 8: the fallbacks
(width-split vocabulary, replicated attention) run beside the plain splits of BART and Whisper.
"""

import dataclasses

import pytest

import encdec
from encdec.engine import Engine
from tests.sharding.batch import engine_config, requests
from tests.sharding.conftest import FAMILY_SHAPES
from tests.sharding.runs import run


def _sequences(out):
    return [(s.token_ids, s.finish_reason) for s in out.sequences]


@pytest.mark.parametrize(
    "family, mesh_shape",
    [(family, shape) for family, shapes in FAMILY_SHAPES.items() for shape in shapes],
    ids=lambda x: x if isinstance(x, str) else f"{x[0]}x{x[1]}",
)
def test_mesh_tokens_equal_single_device(models, family, mesh_shape):
    _, expected = run(models[family], family, None)
    engine, outputs = run(models[family], family, mesh_shape)
    assert engine.mesh.devices.shape == mesh_shape
    assert len(outputs) == len(expected)
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out.finish_reason == ref.finish_reason != "error", (i, out.error)
        assert _sequences(out) == _sequences(ref), (family, mesh_shape, i)
    # The n-best scores too (the same log-probabilities summed in another order: within float noise).
    beam = outputs[4]
    assert len(beam.sequences) == 2
    for ours, theirs in zip(beam.sequences, expected[4].sequences, strict=True):
        assert ours.score == pytest.approx(theirs.score, rel=1e-5, abs=1e-5)
    stats = engine.stats()
    assert (stats.self_pages_used, stats.cross_pages_used, stats.tracked_requests) == (0, 0, 0)
    engine.self_alloc.check_invariants()
    engine.cross_alloc.check_invariants()


def test_incremental_pages_and_preemption_per_data_shard(models):
    """Self pages granted as tokens arrive, from a pool so tight that requests are preempted and
    replayed, each within its data shard: the tokens are still the single-device engine's."""
    _, expected = run(models["bart"], "bart", None)
    config = dataclasses.replace(
        engine_config("bart", (2, 4)), kv_allocation="incremental", kv_reserve_pages=0, num_self_pages=14
    )
    engine = Engine(models["bart"], config)  # 6 self pages per shard: a 2-beam request's whole need
    outputs = engine.generate(requests("bart"))
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out.finish_reason == ref.finish_reason != "error", (i, out.error)
        assert _sequences(out) == _sequences(ref), i
    stats = engine.stats()
    print(f"\nbart (2, 4), 14 self pages: {stats.preemptions} preemptions")
    assert stats.preemptions > 0
    assert (stats.self_pages_used, stats.tracked_requests) == (0, 0)
    engine.self_alloc.check_invariants()


def test_int8_weights_on_a_mesh_give_the_single_device_tokens(models):
    """int8 projections (on CPU: the VNNI kernel's custom call, which has no partitioning rule of
    its own) under a (2, 4) mesh: the scales shard with their weights and the tokens are the
    single-device int8 engine's."""
    model = encdec.quantize_model(models["bart"])
    reqs = [r for r in requests("bart") if r.num_beams == 1]
    expected = Engine(model, engine_config("bart", None)).generate(reqs)
    outputs = Engine(model, engine_config("bart", (2, 4))).generate(reqs)
    for i, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out.finish_reason == ref.finish_reason != "error", (i, out.error)
        assert _sequences(out) == _sequences(ref), i
