"""One smoke run of the Whisper experiment on the tiny model and two clips."""

import json
from pathlib import Path

import pytest

from encdec.bench.whisper import WhisperExperimentConfig
from encdec.cli import main
from encdec.experiment_config import ConfigError
from encdec.whisper.clips import espeak_available, normalize, wer, word_errors

EXPERIMENT = Path(__file__).parents[2] / "experiments" / "whisper_base.yaml"


def test_config_loads_and_rejects_unknown_keys():
    cfg = WhisperExperimentConfig.load(EXPERIMENT, ["num_clips=3", "systems=[encdec]"])
    assert (cfg.num_clips, cfg.systems, cfg.batch_size) == (3, ("encdec",), 16)
    with pytest.raises(ConfigError, match="^num_clip: unknown key"):
        WhisperExperimentConfig.load(EXPERIMENT, ["num_clip=3"])
    with pytest.raises(ConfigError, match="^num_clips: must be an integer"):
        WhisperExperimentConfig.load(EXPERIMENT, ["num_clips=many"])
    with pytest.raises(ConfigError, match="^systems: unknown system"):
        WhisperExperimentConfig.load(EXPERIMENT, ["systems=[encdec, whisper.cpp]"])


def test_word_error_rate():
    assert normalize("Don't stop-it, NOW!") == ["don't", "stop", "it", "now"]
    assert word_errors("the cat sat", "the bat sat down") == (2, 3)
    assert wer(["a b", "c d e"], ["a b", "c e"]) == pytest.approx(1 / 5)


@pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng is not installed (apt-get install -y espeak-ng)"
)
def test_smoke_run_on_tiny_model(tiny_ct2_dir, tmp_path, capsys):
    sets = [
        f"model={tiny_ct2_dir}",
        "num_clips=2",
        "repeats=1",
        "latency_clips=1",
        "batch_size=2",
        "ct2_threads=1",
    ]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", str(EXPERIMENT), "--out", str(tmp_path), *args]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["systems"]) == {"encdec", "ctranslate2"}
    assert results["clips_with_identical_tokens"] == 2
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "| encdec |" in (tmp_path / "results.md").read_text()
    assert "| encdec |" in capsys.readouterr().out
