"""notebooks/whisper_lora.ipynb runs headless on a tiny Whisper: it trains two adapters (two
espeak-ng voices), plots their WER curves and serves the base model and both adapters from one
engine; each of its transcripts equals greedy decoding with that adapter merged into the base."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import encdec
from encdec.lora import load_peft, merge_adapter
from encdec.whisper import load_audio, log_mel_spectrogram
from encdec.whisper.accent import build_split
from encdec.whisper.clips import espeak_available
from encdec.whisper.finetune import load_config
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import greedy_decode
from tests.whisper.fixtures import tiny_ct2_dir, tiny_hf_model  # noqa: F401
from tests.whisper.tiny_whisper import add_word_tokenizer, tiny_lora_experiment

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "whisper_lora.ipynb"
VOICES = {"fr": "fr", "us": "en-us"}


def test_notebook_is_stored_without_outputs():
    nb_ = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb_)
    code = [c for c in nb_.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_notebook_trains_two_adapters_and_serves_them_side_by_side(tiny_ct2_dir, tmp_path):  # noqa: F811
    model_dir = add_word_tokenizer(tiny_ct2_dir, tmp_path / "model")
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(tiny_lora_experiment(model_dir, tmp_path, eval_every=3)))
    params = {
        "EXPERIMENT": str(experiment),
        "VOICES": VOICES,
        "OUT_DIR": str(tmp_path / "out"),
        "NUM_SHOWN": 1,
    }
    nb_ = nbformat.read(NOTEBOOK, as_version=4)
    (index,) = [i for i, c in enumerate(nb_.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb_.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    client = nbclient.NotebookClient(
        nb_, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    out = tmp_path / "out"
    assert (out / "wer_curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "side_by_side.json").read_text())
    assert [(r["voice"], r["adapter"]) for r in rows] == [
        (voice, adapter) for voice in VOICES.values() for adapter in ("base", *VOICES)
    ]
    # Independently of the notebook: each transcript is greedy decoding with its adapter merged.
    model = encdec.load_pretrained(model_dir)
    tokens = WhisperTokens.from_dir(model_dir)
    config = load_config(experiment, ["data.voice=fr"])
    clips = [build_split(dataclasses.replace(config.data, voice=v)).eval_target[0] for v in VOICES.values()]
    mel = np.stack([log_mel_spectrogram(load_audio(c.path), model.config.num_mel_bins) for c in clips])
    for adapter in ("base", *VOICES):
        params_ = model.params
        if adapter != "base":
            params_ = merge_adapter(
                params_, load_peft(out / adapter / "adapter", model.params, model.config)[0]
            )
        merged = dataclasses.replace(model, params=params_)
        ids, _ = greedy_decode(
            merged, mel, tokens, tokens.prompt(), max_new_tokens=config.eval_max_new_tokens
        )
        texts = [tokens.decode(model.tokenizer, i) for i in ids]
        assert [r["text"] for r in rows if r["adapter"] == adapter] == texts, adapter
