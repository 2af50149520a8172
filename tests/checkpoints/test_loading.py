"""Checkpoint layouts and the errors bad checkpoints must raise."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import encdec
from encdec.checkpoints import CheckpointError
from encdec.models import decode, encode, init_dense_kv
from tests.tiny_models import save_hf_model


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    save_hf_model("t5v1_1", d)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _logits(model, ids=(5, 6, 7, 8)):
    ids_BS = jnp.asarray([ids], jnp.int32)
    mask = jnp.ones_like(ids_BS, bool)
    enc = encode(model.params, model.config, ids_BS, mask)
    kv = init_dense_kv(model.params, model.config, enc, mask, 3)
    logits, _ = decode(model.params, model.config, jnp.asarray([[0, 4, 9]]), jnp.arange(3)[None], kv)
    return np.asarray(logits)


def test_sharded_safetensors_and_pytorch_bin_load_the_same_params(t5_dir, tmp_path):
    base = _logits(encdec.load_pretrained(t5_dir))
    sharded = tmp_path / "sharded"
    hf = save_hf_model("t5v1_1", sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    np.testing.assert_array_equal(_logits(encdec.load_pretrained(sharded)), base)
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(t5_dir / "config.json", binary / "config.json")
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    np.testing.assert_array_equal(_logits(encdec.load_pretrained(binary)), base)


def test_untied_head_reads_lm_head(t5_dir, tmp_path):
    """Flan-T5 layout: tie_word_embeddings=false and its own lm_head.weight in the file."""
    d = _copy(t5_dir, tmp_path / "untied")
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(d / "model.safetensors")
    head_VD = np.random.default_rng(0).standard_normal(tensors["shared.weight"].shape).astype(np.float32)
    tensors["lm_head.weight"] = head_VD
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    model = encdec.load_pretrained(d)
    assert not model.config.tie_word_embeddings and not model.config.tied_output_rescale
    np.testing.assert_array_equal(np.asarray(model.params["lm_head"]["w"]), head_VD.T)


def test_bfloat16_params(t5_dir):
    model = encdec.load_pretrained(t5_dir, dtype="bfloat16")
    assert model.params["shared"]["embedding_VD"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda t: t.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight"),
            "missing tensor.*DenseReluDense.wo",
        ),
        (
            lambda t: t.__setitem__(
                "encoder.block.0.layer.0.SelfAttention.qq.weight",
                t.pop("encoder.block.0.layer.0.SelfAttention.q.weight"),
            ),
            "unexpected tensor 'encoder.block.0.layer.0.SelfAttention.qq.weight'",
        ),
        (
            lambda t: t.__setitem__(
                "encoder.block.0.layer.0.SelfAttention.k.weight", np.zeros((48, 33), np.float32)
            ),
            r"SelfAttention.k.weight' has shape \(48, 33\), expected \(48, 32\)",
        ),
    ],
    ids=["missing", "renamed", "wrong-shape"],
)
def test_bad_tensors_are_named(t5_dir, tmp_path, mutate, message):
    d = _copy(t5_dir, tmp_path / "bad")
    tensors = load_file(d / "model.safetensors")
    mutate(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        encdec.load_pretrained(d)


def test_truncated_file(t5_dir, tmp_path):
    d = _copy(t5_dir, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        encdec.load_pretrained(d)


def test_missing_files_and_unknown_model_type(t5_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        encdec.load_pretrained(tmp_path / "nope")
    d = _copy(t5_dir, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        encdec.load_pretrained(d)
    d = _copy(t5_dir, tmp_path / "unknown")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "longt5"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(encdec.UnsupportedModelError, match="'longt5'"):
        encdec.load_pretrained(d)


def test_unsupported_option_is_named():
    with pytest.raises(encdec.UnsupportedModelError, match="feed_forward_proj='gated-tanhshrink'"):
        encdec.ModelConfig.from_hf(
            {
                "model_type": "t5",
                "feed_forward_proj": "gated-tanhshrink",
                "num_layers": 1,
                "vocab_size": 8,
                "d_model": 4,
                "d_kv": 2,
                "d_ff": 4,
                "num_heads": 2,
            }
        )


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_and_bool_weights_are_refused_by_name(t5_dir, tmp_path, dtype):
    d = _copy(t5_dir, tmp_path / "ints")
    tensors = load_file(d / "model.safetensors")
    name = "decoder.block.0.layer.0.SelfAttention.q.weight"
    tensors[name] = np.ones(tensors[name].shape, dtype)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' .* has dtype .*: weights must be floating"):
        encdec.load_pretrained(d)


def test_integer_weights_in_a_pytorch_bin_are_refused(t5_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(t5_dir / "config.json", d / "config.json")
    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(t5_dir / "model.safetensors").items()}
    state["shared.weight"] = state["shared.weight"].long()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="'shared.weight' .* has dtype int64"):
        encdec.load_pretrained(d)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "config.json is not UTF-8 text"),
        (b"[1, 2, 3]", "config.json must hold a JSON object, got a JSON list"),
        (b'"t5"', "config.json must hold a JSON object, got a JSON str"),
        (b"{not json", "config.json is not valid JSON"),
        (b'{"model_type": "t5", "num_layers": "three"}', "config.json is not a usable model config"),
    ],
    ids=["binary", "list", "string", "invalid", "bad-value"],
)
def test_bad_config_files_name_the_file(t5_dir, tmp_path, content, message):
    d = _copy(t5_dir, tmp_path / "cfg")
    (d / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        encdec.load_pretrained(d)


def test_shard_paths_are_confined_to_the_model_directory(tmp_path):
    d = tmp_path / "sharded"
    save_hf_model("t5v1_1", d, max_shard_size="20KB")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(d / first, outside / first)
    moved = {k: (f"../elsewhere/{v}" if v == first else v) for k, v in index["weight_map"].items()}
    index["weight_map"] = moved
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        encdec.load_pretrained(d)


def test_shards_linked_into_a_hub_cache_blob_folder_load(tmp_path):
    """The HF hub cache's snapshot files are symlinks to ``../../blobs/<hash>``: allowed."""
    d = tmp_path / "snapshots" / "abc"
    save_hf_model("t5v1_1", d, max_shard_size="20KB")
    want = encdec.load_pretrained(d).params
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in d.glob("*.safetensors"):
        shutil.move(shard, blobs / shard.name)
        shard.symlink_to(Path("../..") / "blobs" / shard.name)
    got = encdec.load_pretrained(d).params
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_fifo_named_config_json_is_refused_not_opened(t5_dir, tmp_path):
    import os

    d = _copy(t5_dir, tmp_path / "fifo")
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")  # opening it for reading would block forever
    with pytest.raises(CheckpointError, match="config.json is not a regular file"):
        encdec.load_pretrained(d)
