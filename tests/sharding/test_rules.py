"""The placement rules on real model shapes, and the errors a bad mesh setup gets (no compiles)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from encdec.engine import EngineConfig
from encdec.engine.data_shards import DataShards
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


def test_a_request_takes_slots_and_pages_in_one_shard():
    shards = DataShards(8, 2, self_pages_per_shard=5, cross_pages_per_shard=3)
    owners: list[int | None] = [None] * 8
    first = shards.place(owners, 3, 1, 2)
    assert first.shard == 0 and first.slots == (0, 1, 2) and first.cross_pages == (1, 2)
    for s in first.slots:
        owners[s] = 0
    second = shards.place(owners, 2, 2, 1)  # shard 1 has more free slots now
    assert second.shard == 1 and second.slots == (4, 5)
    assert {p for pages in second.self_pages for p in pages} == {1, 2, 3, 4}  # local ids, own allocator
    assert shards.place(owners, 2, 1, 2) is None  # shard 0: one free slot; shard 1: no self pages left
    shards.release(second.slots, second.self_pages, second.cross_pages)
    assert shards.self_alloc.num_used == 3 and shards.cross_alloc.num_used == 2
    shards.self_alloc.check_invariants()
