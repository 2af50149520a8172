"""What each device holds: parameters and KV pools split, only small or unsplittable leaves whole.

Per device, parameters = split bytes / model-axis size + replicated bytes (the vocabulary padded
to a multiple of the axis), and KV pools = pool bytes / (data x model) when the heads split
(pages over ``data``, heads over ``model``), / data when they do not. The figures are printed.
"""

import jax
import pytest

from encdec.sharding import bytes_per_device, split_bytes
from tests.sharding.conftest import FAMILY_SHAPES
from tests.sharding.runs import run


def _replicated_leaves(params):
    out = []
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        if all(axis is None for axis in leaf.sharding.spec):
            out.append(("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp), leaf))
    return out


@pytest.mark.parametrize("family", ["bart", "t5", "whisper"])
def test_bytes_per_device(models, family):
    cfg = models[family].config
    total = sum(x.nbytes for x in jax.tree.leaves(models[family].params))
    print(f"\n{family}: parameters {total:,} bytes; bytes per device")
    print("  mesh    params/device = split/model + replicated          KV pools/device = KV / shards")
    for shape in FAMILY_SHAPES[family]:
        engine, _ = run(models[family], family, shape)
        data, model = shape
        params, pools = engine.params, engine.state.pools
        split = split_bytes(params, engine.mesh)
        per_device = set(bytes_per_device(params).values())
        kv_per_device = set(bytes_per_device(pools).values())
        heads = model if cfg.decoder_heads % model == 0 else 1
        kv_shards = data * heads
        print(
            f"  {shape!s:7s} {max(per_device):>13,} = {split['sharded']:,}/{model} + {split['replicated']:,}"
            f"{'':8s} {max(kv_per_device):>9,} = {pools.nbytes:,}/{kv_shards}"
        )
        assert per_device == {split["sharded"] // model + split["replicated"]}
        assert kv_per_device == {pools.nbytes // kv_shards}
        assert len(bytes_per_device(params)) == data * model
        if model == 1:
            continue
        # Whole on every device: vectors (norms, biases), position tables, Whisper's convolutions
        # and attention whose heads the axis does not divide. Never the vocabulary or the MLP.
        for path, leaf in _replicated_leaves(params):
            attention = any(part in path.split("/") for part in ("attn", "cross_attn", "rel_bias_NR"))
            small = leaf.ndim == 1 or "pos_embedding" in path or "conv" in path
            assert small or (attention and heads == 1), path
