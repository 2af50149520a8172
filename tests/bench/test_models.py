"""Benchmarks on a local HF checkpoint: config checks, ordinary-token ranges, a run of every system."""

import json
import shutil

import pytest

from encdec.bench.config import ConfigError
from encdec.bench.config import load_experiment_dict as load_dict
from encdec.bench.models import checkpoint_token_range, ct2_model_dir, resolve_model
from encdec.bench.run import run_experiment
from encdec.bench.shapes import get_shape, write_shape
from encdec.bench.systems import available_systems
from tests.tiny_models import VOCAB, save_hf_model

WORKLOAD = {"name": "w", "num_requests": 3, "input_len": {"kind": "uniform", "low": 2, "high": 9},
            "output_len": {"kind": "uniform", "low": 1, "high": 5}}


@pytest.fixture(scope="module")
def local_t5(tmp_path_factory):
    """A tiny-t5 checkpoint copied out of the shape cache, as a user's own folder would be."""
    src = write_shape("tiny-t5", cache_dir=tmp_path_factory.mktemp("shapes"))
    return shutil.copytree(src, tmp_path_factory.mktemp("mine") / "my-t5")


def _experiment(models, **kw):
    return load_dict({"name": "t", "models": models, "workloads": [WORKLOAD], **kw})


@pytest.mark.parametrize(
    "model, words",
    [
        ({"shape": "tiny-t5", "path": "/x"}, "exactly one"),
        ({"dtype": "float32"}, "exactly one"),
        ({"path": "/no/such/dir"}, "is not a directory"),
    ],
)
def test_model_spec_needs_exactly_one_existing_source(model, words):
    with pytest.raises(ConfigError, match=words) as info:
        _experiment([model])
    assert info.value.key.startswith("models[0].")


def test_path_without_config_json_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        _experiment([{"path": str(tmp_path)}])


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart"])
def test_checkpoint_token_range_agrees_with_the_shape_table(name, tmp_path):
    # Two independent derivations: the shape's hand-written range, and the checkpoint's tokenizer
    # and config special ids.
    hf_dir = write_shape(name, cache_dir=tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    assert checkpoint_token_range(hf_dir, config) == get_shape(name).token_range


def test_marian_pad_at_the_top_of_the_vocabulary_is_excluded(tmp_path):
    save_hf_model("marian", tmp_path)  # no tokenizer: the config's ids are all there is
    config = json.loads((tmp_path / "config.json").read_text())
    low, high = checkpoint_token_range(tmp_path, config)
    assert (low, high) == (1, VOCAB - 1)
    assert config["pad_token_id"] == VOCAB - 1 and config["eos_token_id"] == 0


def test_local_checkpoint_runs_every_system_with_matching_outputs(local_t5, tmp_path):
    ok = available_systems()
    systems = [s for s in ("encdec-inflight", "encdec-static", "hf-generate", "ctranslate2") if ok[s] is None]
    cfg = _experiment([{"path": str(local_t5)}], systems=systems, num_slots=[2], warmup="none",
                      cache_dir=str(tmp_path / "cache"))
    results = run_experiment(cfg, tmp_path / "out", progress=False)
    assert list(results["model"]) == ["my-t5"]
    assert results["model"]["my-t5"]["path"] == str(local_t5.resolve())
    assert [r["system"] for r in results["runs"]] == systems
    for run in results["runs"]:
        assert run["model"] == "my-t5"
        assert run["outputs_match_reference"] is True, (run["system"], run["first_mismatch"])


@pytest.mark.skipif(available_systems()["ctranslate2"] is not None, reason="ctranslate2 is not installed")
def test_local_conversion_is_cached_until_the_checkpoint_changes(local_t5, tmp_path):
    spec = resolve_model(_experiment([{"path": str(local_t5)}]).models[0])
    assert spec.hf_dir == local_t5.resolve()
    cfg = _experiment([{"path": str(local_t5)}]).models[0]
    first = ct2_model_dir(cfg, tmp_path)
    assert ct2_model_dir(cfg, tmp_path) == first
    (local_t5 / "notes.txt").write_text("edited")
    try:
        second = ct2_model_dir(cfg, tmp_path)
    finally:
        (local_t5 / "notes.txt").unlink()
    assert second != first and (second / "model.bin").exists()
