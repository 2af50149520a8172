"""The placement rules on real model shapes, and the errors a bad mesh setup gets (no compiles)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from encdec.engine import EngineConfig
from encdec.engine.data_shards import DataShards
from encdec.engine.scheduler import NeverFits, Scheduler, SeqSpec
from encdec.sharding import MODEL, make_mesh, pad_param, padding, param_spec


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 4))


@pytest.mark.parametrize(
    "path, shape, spec, padded",
    [
        (("decoder", "layers", 0, "attn", "q", "w"), (1024, 16, 64), P(None, MODEL, None), None),
        (("decoder", "layers", 0, "attn", "o", "w"), (16, 64, 1024), P(MODEL, None, None), None),
        (("decoder", "layers", 0, "attn", "q", "w"), (1024, 5, 64), P(None, None, None), None),  # 5 heads
        (("decoder", "layers", 0, "cross_attn", "k", "b"), (3, 64), P(None, None), None),  # 3 heads
        (("encoder", "layers", 3, "ffn", "wi_1", "w"), (4096, 10240), P(None, MODEL), None),
        (("encoder", "layers", 3, "ffn", "wo", "w"), (10240, 4096), P(MODEL, None), None),
        (("decoder", "layers", 1, "ffn", "wi", "b"), (4098,), P(None), None),  # an MLP 4 does not divide
        (("shared", "embedding_VD"), (50265, 1024), P(MODEL, None), (50268, 1024)),  # BART: padded
        (("lm_head", "w"), (1024, 51865), P(None, MODEL), (1024, 51868)),  # Whisper
        (("final_logits_bias_V",), (50265,), P(MODEL), (50268,)),
        (("decoder", "rel_bias_NR"), (64, 32), P(MODEL, None), None),
        (("decoder", "layers", 0, "ffn_norm", "scale"), (4096,), P(None), None),
        (("encoder", "conv1", "w"), (3, 80, 512), P(None, None, None), None),
    ],
)
def test_logical_axis_rules(mesh, path, shape, spec, padded):
    pads = padding(path, shape, mesh)
    final = tuple(n + after for n, (_, after) in zip(shape, pads, strict=True))
    assert final == (padded or shape)
    assert param_spec(path, final, mesh) == spec


def test_padding_adds_zero_rows(mesh):
    table = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    out = pad_param(("shared", "embedding_VD"), table, mesh)
    assert out.shape == (12, 3) and not out[10:].any() and (out[:10] == table).all()
    on_device = pad_param(("shared", "embedding_VD"), jax.numpy.asarray(table), mesh)
    assert isinstance(on_device, jax.Array) and on_device.shape == (12, 3)


def test_bad_meshes_and_shards_are_named():
    with pytest.raises(ValueError, match="mesh_shape .* needs 16 devices; there are 8"):
        make_mesh((4, 4))
    with pytest.raises(ValueError, match="two positive integers"):
        make_mesh((0, 8))
    with pytest.raises(ValueError, match="mesh_shape must hold 2 integers, got 1"):
        EngineConfig(mesh_shape=(8,))
    assert EngineConfig(mesh_shape=[2, 4]).mesh_shape == (2, 4)
    with pytest.raises(ValueError, match="num_slots=6 must be a multiple of the mesh's data axis"):
        DataShards(6, 4, self_pages_per_shard=4, cross_pages_per_shard=4)


def _scheduler(shards: int, pages_per_shard=(16, 5), **overrides) -> Scheduler:
    config = EngineConfig(
        num_slots=8, page_size=4, max_encoder_len=16, encoder_buckets=(16,), max_new_tokens=12,
        steps_per_dispatch=4, max_num_beams=4, **overrides,
    )
    self_pages, cross_pages = pages_per_shard
    return Scheduler(config, num_self_pages=self_pages, num_cross_pages=cross_pages, data_shards=shards)


def _spec(rid: int, *, width: int = 1, key=None, steps: int = 12) -> SeqSpec:
    return SeqSpec(rid, encoder_len=8, bucket=16, decode_steps=steps, width=width, input_key=key)


def test_a_request_takes_slots_and_pages_in_one_shard_and_shares_cross_pages_there():
    sched = _scheduler(2)
    for spec in (_spec(0, width=3, key="x"), _spec(1, width=2), _spec(2, key="x"), _spec(3, width=3)):
        sched.add(spec)
    a0, a1, a2 = sched.schedule().admitted  # the 4th waits: no shard has 3 free slots left
    assert a0.slots == (0, 1, 2) and a0.cross_pages == (1, 2) and a0.encode  # a tie: shard 0
    assert a1.slots == (4, 5)  # shard 1 has more free slots
    assert {p for pages in a1.self_pages for p in pages} == set(range(1, 7))  # local to shard 1's block
    assert a1.cross_pages == (1, 2) and a1.encode
    # The same input as request 0: shard 0 (fewer free slots) holds its cross pages, so it runs
    # there and shares them without an encode.
    assert a2.slots == (3,) and a2.cross_pages == a0.cross_pages and not a2.encode
    assert sched.num_queued == 1 and sched.cross_cache.hits == 1
    assert [sched.shards.self_allocs[d].num_used for d in (0, 1)] == [12, 6]  # 3 pages per slot
    for rid in (0, 1, 2):
        sched.finish(rid)
    sched.cross_cache.clear_idle()
    assert sched.self_alloc.num_used == 0 and sched.cross_alloc.num_used == 0
    sched.self_alloc.check_invariants()
    sched.cross_alloc.check_invariants()
    with pytest.raises(NeverFits, match="request needs 5 slots; a data shard has 4"):
        sched.add(_spec(9, width=5))


def test_incremental_pages_grow_and_preempt_within_each_shard():
    # 3 usable self pages per shard; each request needs 1 page per 4-step dispatch, 3 in all.
    sched = _scheduler(2, kv_allocation="incremental", kv_reserve_pages=0, pages_per_shard=(4, 9))
    for rid in range(4):
        sched.add(_spec(rid))
    plan = sched.schedule()
    assert [a.slots for a in plan.admitted] == [(0,), (4,), (1,), (5,)]  # alternating shards
    assert not plan.grants and not plan.preempted
    plan = sched.schedule()  # each shard: 2 more pages needed, 1 free: its latest request yields
    assert plan.preempted == (2, 3) and list(sched.queued()) == [2, 3]
    assert sorted(g.slot for g in plan.grants) == [0, 4] and all(1 <= g.page < 4 for g in plan.grants)
    assert [sched.shards.self_allocs[d].num_used for d in (0, 1)] == [2, 2]
    sched.self_alloc.check_invariants()
