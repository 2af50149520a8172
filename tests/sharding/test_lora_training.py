"""A LoRA training step over every mesh: the batch on ``data``, the frozen base on ``model``.

Its loss (and the updated adapter) equals the single-device step's within 1e-5: the same sums
in another order (gradients are all-reduced over ``data``, projections over ``model``).
"""

import jax
import numpy as np
import pytest

import encdec
from encdec.lora import LoraConfig
from encdec.lora.data import DataConfig, load_splits, train_batch
from encdec.lora.finetune import TinyT5Config, write_tiny_t5
from encdec.lora.train import TrainConfig, fit, shard_batch
from encdec.sharding import make_mesh
from tests.sharding.conftest import MESH_SHAPES

LORA = LoraConfig(rank=4, target_modules=("q", "v", "o", "wi", "wo"))
TRAIN = TrainConfig(steps=2, batch_size=8, grad_accum=2, warmup_steps=1, learning_rate=1e-2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 4 heads and 64 FFN units: split on a 4-way model axis, replicated heads on an 8-way one.
    directory = write_tiny_t5(tmp_path_factory.mktemp("t5"), TinyT5Config(d_model=32, d_ff=64, num_layers=1))
    model = encdec.load_pretrained(directory)
    data = DataConfig(num_train=64, num_eval=8)
    train, _ = load_splits(data, model.config)
    reference = fit(model, LORA, TRAIN, data, train)
    return model, data, train, reference


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_training_steps_equal_single_device(setup, mesh_shape):
    model, data, train, reference = setup
    mesh = make_mesh(mesh_shape)
    result = fit(model, LORA, TRAIN, data, train, mesh=mesh)
    for ours, theirs in zip(result.history, reference.history, strict=True):
        assert abs(ours["loss"] - theirs["loss"]) < 1e-5, (mesh_shape, ours, theirs)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    print(f"mesh {mesh_shape}: losses {[r['loss'] for r in result.history]}")
    # The adapter after two updates, and where it lives: split like the weights it adapts.
    pairs = zip(jax.tree.leaves(result.state.weights), jax.tree.leaves(reference.state.weights), strict=True)
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-6)
    q_b = result.state.weights["decoder"]["layers"][0]["attn"]["q"]["b"]  # [r, N, H]
    assert len(q_b.sharding.device_set) == mesh.size
    if mesh_shape == (2, 4):
        assert q_b.addressable_shards[0].data.shape == (4, 1, 16)  # one of the 4 heads


def test_batches_split_over_data(setup):
    model, data, train, _ = setup
    batch = train_batch(train, model.config, data, 0, 8, 2)
    placed = shard_batch(batch, make_mesh((8, 1)))
    assert {s.data.shape for s in placed["source_ids"].addressable_shards} == {(2, 1, data.max_source_len)}
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the mesh's data axis"):
        shard_batch(train_batch(train, model.config, data, 0, 6, 1), make_mesh((4, 2)))
