"""Experiment configs: every bad key or value is an error that names it; overrides are YAML-typed."""

from pathlib import Path

import pytest

from encdec.bench.config import ConfigError, ExperimentConfig, LengthDist, load_experiment
from encdec.bench.config import load_experiment_dict as load_dict

BENCH_EXPERIMENTS = ("quickstart", "bench_cpu", "bench_gpu", "bench_cpu_int8", "bench_gpu_int8")
EXPERIMENTS = [Path(__file__).parents[2] / "experiments" / f"{n}.yaml" for n in BENCH_EXPERIMENTS]


def _base(**kw):
    data = {
        "name": "t",
        "models": [{"shape": "tiny-t5"}],
        "workloads": [{"name": "w", "num_requests": 4, "input_len": {"kind": "fixed", "value": 8},
                       "output_len": {"kind": "uniform", "low": 2, "high": 6}}],
    }
    data.update(kw)
    return data


def _wl(**kw):
    """A config whose one workload has the mixed profile plus ``kw`` (None removes a key)."""
    workload = {"name": "w", "profile": "mixed", **kw}
    return _base(workloads=[{k: v for k, v in workload.items() if v is not None}])


def _error(data, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_dict(data, overrides)
    return info.value


def test_minimal_config_gets_defaults():
    cfg = load_dict(_base())
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.num_slots == (8,)
    assert cfg.workloads[0].output_len == LengthDist("uniform", low=2, high=6)
    assert cfg.models[0].dtype == "float32"
    hash(cfg.workloads[0])  # frozen


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (_base(num_slotz=[8]), "num_slotz"),
        (_base(engine={"page_sise": 8}), "engine.page_sise"),
        (_base(workloads=[{"name": "w", "profile": "mixed", "arival": "poisson"}]), "workloads[0].arival"),
        (_base(models=[{"shape": "tiny-t5", "dtype": "float32", "extra": 1}]), "models[0].extra"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(data, key):
    err = _error(data)
    assert err.key == key
    assert str(err).startswith(key) and "unknown key" in str(err)


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        (_wl(arrival="poison"), "workloads[0].arrival", "poison"),
        (_wl(num_requests=0), "workloads[0].num_requests", ">= 1"),
        (_wl(num_requests="many"), "workloads[0].num_requests", "integer"),
        (_wl(rate=-1), "workloads[0].rate", "> 0"),
        (_wl(profile="sprint"), "workloads[0].profile", "sprint"),
        (_wl(profile=None), "workloads[0].input_len", "required"),
        (_wl(output_len={"kind": "uniform", "low": 9, "high": 3}), "workloads[0].output_len.high", ">= low"),
        (_base(models=[{"shape": "t5-huge"}]), "models[0].shape", "t5-huge"),
        (_base(models=[{"shape": "tiny-t5", "dtype": "float64"}]), "models[0].dtype", "float64"),
        (_base(models=[]), "models", "at least one"),
        (_base(systems=["encdec-inflight", "vllm"]), "systems[1]", "vllm"),
        (_base(systems=["hf-generate", "hf-generate"]), "systems", "repeats"),
        (_base(num_slots=[8, 0]), "num_slots[1]", ">= 1"),
        (_base(check_outputs="yes"), "check_outputs", "true or false"),
        (_base(warmup="always"), "warmup", "always"),
        (_base(hf={"device": "tpu"}), "hf.device", "tpu"),
        (_base(engine={"options": [1]}), "engine.options", "mapping"),
        ({"models": [{"shape": "tiny-t5"}], "workloads": [{"name": "w", "profile": "mixed"}]}, "name",
         "required"),
    ],
)
def test_bad_values_are_errors_naming_the_key(data, key, words):
    err = _error(data)
    assert err.key == key, str(err)
    assert str(err).startswith(key) and words in str(err)


def test_overrides_are_yaml_typed():
    cfg = load_dict(
        _base(),
        [
            "num_slots=[2, 4]", "workloads.0.arrival=poisson", "workloads.0.rate=2.5", "check_outputs=false",
            "engine.options={steps_per_dispatch: 2}", "models.0.dtype=bfloat16", "description=a b",
        ],
    )
    assert cfg.num_slots == (2, 4)
    assert cfg.workloads[0].arrival == "poisson" and cfg.workloads[0].rate == 2.5
    assert cfg.check_outputs is False
    assert cfg.engine.options == {"steps_per_dispatch": 2}
    assert cfg.models[0].dtype == "bfloat16"
    assert cfg.description == "a b"


def test_scalar_for_a_list_field_and_broadcast_over_list_items():
    data = _base(workloads=[{"name": "a", "profile": "mixed"}, {"name": "b", "profile": "translation"}])
    cfg = load_dict(data, ["num_slots=16", "workloads.num_requests=3"])
    assert cfg.num_slots == (16,)
    assert [w.num_requests for w in cfg.workloads] == [3, 3]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("workloads.0.nmu_requests=3", "workloads[0].nmu_requests"),
        ("engine.page_size=big", "engine.page_size"),
        ("workloads.5.rate=1", "workloads[5]"),
        ("num_slots", "num_slots"),
        ("bandwidth_probe_mib=0", "bandwidth_probe_mib"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    assert _error(_base(), [override]).key == key


def test_load_experiment_takes_the_file_name_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("models: [{shape: tiny-bart}]\nworkloads: [{name: w, profile: translation}]\n")
    cfg = load_experiment(path, ["num_slots=[3]"])
    assert cfg.name == "exp" and cfg.num_slots == (3,)
    path.write_text("models: [{shape: tiny-bart}]\nworkloads: {name: w}\nnope: 1\n")
    with pytest.raises(ConfigError, match="^nope"):
        load_experiment(path)
    with pytest.raises(FileNotFoundError):
        load_experiment(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_loads(path):
    cfg = load_experiment(path)
    assert cfg.name == path.stem
    assert cfg.to_dict()["models"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("runs=[encdec:0]", "runs: 'encdec:0' is not system:beam_size"),
        ("runs=[whisper_cpp:1]", "runs: 'whisper_cpp:1' is not system:beam_size"),
        ("peer_compute_type=int4", "peer_compute_type: 'int4' is not one of float32, int8"),
    ],
)
def test_longform_experiment_refuses_bad_runs_and_compute_types(override, words):
    from encdec.bench.whisper_longform import LongFormExperimentConfig

    path = Path(__file__).parents[2] / "experiments" / "whisper_longform.yaml"
    assert LongFormExperimentConfig.load(path, ["peer_compute_type=int8"]).peer_compute_type == "int8"
    with pytest.raises(ConfigError, match=words):
        LongFormExperimentConfig.load(path, [override])
