"""Loading reads one tensor at a time: peak host memory stays near the checkpoint's size."""

import json
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from encdec.checkpoints.hf import tensor_specs
from encdec.config import ModelConfig

_PROBE = """
import resource, sys
import encdec, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = encdec.load_pretrained(sys.argv[1], tokenizer=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_peak_memory_is_under_twice_the_checkpoint(tmp_path):
    hf = {
        "model_type": "t5",
        "vocab_size": 32000,
        "d_model": 512,
        "d_kv": 64,
        "d_ff": 2048,
        "num_layers": 6,
        "num_heads": 8,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    }
    cfg = ModelConfig.from_hf(hf)
    rng = np.random.default_rng(0)
    tensors = {
        name: rng.standard_normal(spec.hf_shape, dtype=np.float32) for name, spec in tensor_specs(cfg).items()
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    size = (tmp_path / "model.safetensors").stat().st_size
    del tensors
    assert size > 200e6
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, check=True
    )
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint {size / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.0f} MB")
    assert growth < 2.0 * size, f"loading {size / 1e6:.0f} MB grew the peak RSS by {growth / 1e6:.0f} MB"
