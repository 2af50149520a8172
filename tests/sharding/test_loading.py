"""Loading onto a mesh: each device receives only its block, and host memory stays bounded.

The loader reads one tensor at a time and hands each device its slice
(``jax.make_array_from_callback``), so loading onto 8 devices takes the host memory loading onto
one takes (the 8 CPU "devices" live in host memory: their blocks add up to one copy). A full copy
per device would take 8.
"""

import json
import subprocess
import sys

import jax
import numpy as np
from safetensors.numpy import save_file

import encdec
from encdec.checkpoints.hf import tensor_specs
from encdec.config import ModelConfig
from encdec.sharding import MODEL, bytes_per_device, make_mesh, split_bytes

_PROBE = """
import os, sys
import encdec, jax, jax.numpy as jnp
from encdec.sharding import make_mesh
jnp.zeros(1).block_until_ready()
mesh = make_mesh((1, 8)) if sys.argv[2] == "mesh" else None
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident now
model = encdec.load_pretrained(sys.argv[1], tokenizer=False, mesh=mesh)
# This process's own high-water mark: ru_maxrss would also count the pytest process it was
# forked from (Linux carries the parent's peak across fork and exec).
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0]) * 1024
assert jax.device_count() == 8
print(peak - before, max(len(x.sharding.device_set) for x in jax.tree.leaves(model.params)))
"""


HF = {
    "model_type": "t5",
    "vocab_size": 16003,  # not a multiple of 8: padded on load
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 4,
    "num_heads": 8,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}


def _checkpoint(directory, hf):
    cfg = ModelConfig.from_hf(hf)
    rng = np.random.default_rng(0)
    specs = tensor_specs(cfg)
    tensors = {name: rng.standard_normal(spec.hf_shape, dtype=np.float32) for name, spec in specs.items()}
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(hf))
    return (directory / "model.safetensors").stat().st_size


def test_sharded_loading_takes_the_host_memory_of_single_device_loading(tmp_path):
    size = _checkpoint(tmp_path, HF)
    assert size > 100e6
    command = [sys.executable, "-c", _PROBE, str(tmp_path)]
    probes = {how: subprocess.Popen([*command, how], stdout=subprocess.PIPE, text=True)
              for how in ("one", "mesh")}
    growth = {}
    for how, p in probes.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, how
        peak, devices = map(int, out.split()[-2:])
        assert devices == (8 if how == "mesh" else 1)
        growth[how] = peak
    print(
        f"checkpoint {size / 1e6:.0f} MB, peak RSS growth while loading: one device "
        f"{growth['one'] / 1e6:.0f} MB, 8 devices {growth['mesh'] / 1e6:.0f} MB"
    )
    # Both count the checkpoint's mapped pages and the arrays: about twice the checkpoint.
    assert growth["mesh"] < 1.1 * growth["one"] + 32e6
    assert growth["mesh"] < 2.5 * size


def test_each_device_receives_its_block(tmp_path):
    hf = {**HF, "vocab_size": 99, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
    _checkpoint(tmp_path, hf)
    mesh = make_mesh((2, 4))
    model = encdec.load_pretrained(tmp_path, tokenizer=False, mesh=mesh)
    reference = encdec.load_pretrained(tmp_path, tokenizer=False)
    wi = model.params["decoder"]["layers"][1]["ffn"]["wi_0"]["w"]  # [D, F]: F over model
    assert wi.sharding.spec[1] == MODEL
    assert {s.data.shape for s in wi.addressable_shards} == {(32, 16)}
    head = model.params["lm_head"]["w"]  # [D, V], V = 99 padded to 100
    assert head.shape == (32, 100) and {s.data.shape for s in head.addressable_shards} == {(32, 25)}
    np.testing.assert_array_equal(np.asarray(head)[:, :99], np.asarray(reference.params["lm_head"]["w"]))
    assert not np.asarray(head)[:, 99:].any()
    split = split_bytes(model.params, mesh)
    assert set(bytes_per_device(model.params).values()) == {split["sharded"] // 4 + split["replicated"]}
    # Replicated: the norms only (this T5 has no biases).
    replicated = [x for x in jax.tree.leaves(model.params) if all(a is None for a in x.sharding.spec)]
    assert all(x.ndim == 1 for x in replicated) and split["replicated"] == sum(x.nbytes for x in replicated)
    # The same model: greedy tokens through the padded vocabulary equal the unpadded model's.
    ids = [[5, 17, 42, 8, 3]]
    ours, theirs = (encdec.reference_generate(m, ids, 6)[0].token_ids for m in (model, reference))
    assert ours == theirs
