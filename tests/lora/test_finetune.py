"""The experiment config (YAML, --set, errors naming keys) and a one-shot finetune run + resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import encdec
from encdec.cli import main as cli_main
from encdec.lora import load_peft
from encdec.lora.finetune import (
    ConfigError,
    ExperimentConfig,
    TinyT5Config,
    finetune,
    finetune_cli,
    load_config,
    write_tiny_t5,
)
from tests.lora import forward, random_batch, strict_rank_promotion  # noqa: F401 (autouse)

EXPERIMENT = Path(__file__).parents[2] / "experiments" / "lora_finetune.yaml"
SMALL = [
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "eval_every=2",
    "checkpoint_every=2",
    "data.num_train=64",
    "data.num_eval=8",
    "tiny_model.d_model=16",
    "tiny_model.d_ff=32",
    "tiny_model.num_layers=1",
    "lora.rank=2",
]


def test_the_experiment_file_is_valid():
    config = load_config(EXPERIMENT)
    assert isinstance(config, ExperimentConfig)
    assert config.lora.target_modules == "all-linear" and config.train.steps >= 1000


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        EXPERIMENT, ["train.steps=70", "lora.target_modules=[q, v]", "lora.alpha=4", "model.path=null"]
    )
    assert config.train.steps == 70 and config.lora.target_modules == ("q", "v") and config.lora.alpha == 4.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["lora.rnak=4"], "^lora.rnak: unknown key"),
        (["learning_rate=1e-3"], "^learning_rate: unknown key"),
        (["lora.rank=0"], "^lora.rank: must be a positive integer"),
        (["train.learning_rate=fast"], "^train.learning_rate: must be a number, got 'fast'"),
        (["train.steps=2.5"], "^train.steps: must be an integer"),
        (["data.task=sort"], "^data.task: must be 'reverse' or 'files'"),
        (["eval_every=0"], "^eval_every: must be positive"),
        (["lora.dropout=1.5"], "^lora.dropout: must be in"),
        (["train.schedule=step"], "^train.schedule: must be constant, cosine or linear"),
        (["lora.rank.x=1"], "^lora.rank: cannot set 'x' inside 8"),
        (["lora=3"], "^lora: must be a mapping"),
        (["model.path=[1]"], "^model.path: must be a string, got \\[1\\]"),
        (["lora.target_modules=[1]"], "^lora.target_modules: \\[1\\] is not a valid tuple"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EXPERIMENT, overrides)


def test_cli_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: -1\n")
    assert finetune_cli(str(bad), [], str(tmp_path / "out")) == 2
    assert "lora.rank: must be a positive integer" in capsys.readouterr().err


def test_cli_refuses_a_stop_after_that_is_not_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["finetune", str(EXPERIMENT), "--stop-after", "0"])
    assert exit_.value.code == 2
    assert "--stop-after: must be a positive integer, got '0'" in capsys.readouterr().err


def test_tiny_model_is_a_hugging_face_checkpoint(tmp_path):
    directory = write_tiny_t5(tmp_path, TinyT5Config(d_model=16, d_ff=32, num_layers=1))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(directory)).eval()
    model = encdec.load_pretrained(directory)
    ids, mask, dec = random_batch(model.config, high=30)
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
        )
    np.testing.assert_allclose(
        forward(model.params, model.config, ids, mask, dec), theirs.logits.numpy(), atol=1e-4
    )


def test_finetune_writes_results_and_resumes(tmp_path):
    config = load_config(EXPERIMENT, SMALL)
    out = tmp_path / "run"
    overrides = [arg for o in SMALL for arg in ("--set", o)]
    assert cli_main(["finetune", str(EXPERIMENT), *overrides, "--out", str(out), "--stop-after", "3"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["steps"] == 3 and not summary["finished"]
    summary = finetune(config, out, progress=False)  # resumes from the step-3 checkpoint
    assert summary["steps"] == 4 and summary["finished"]
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.json",
        "curve.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "base_model/model.safetensors",
    ):
        assert (out / name).exists(), name
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in history if "exact_match" in r] == [0, 2, 4]
    csv_rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert csv_rows[0].startswith("step,loss,lr") and len(csv_rows) == 6
    model = encdec.load_pretrained(out / "base_model")
    lora, lc = load_peft(out / "adapter", model.params, model.config)
    assert lc.rank == 2
    with pytest.raises(ConfigError, match="different config"):
        finetune(load_config(EXPERIMENT, [*SMALL, "lora.rank=3"]), out, progress=False)
