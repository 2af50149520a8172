"""``encdec generate`` on a tiny checkpoint with a tokenizer: text in, the HF model's text out."""

import subprocess
import sys

import torch

import encdec
from tests.tiny_models import hf_generation_config, save_hf_model, save_word_tokenizer


def test_generate_command_prints_hf_greedy_text(tmp_path):
    hf = save_hf_model("t5", tmp_path, seed=1)  # seed 0 greedily emits only padding
    save_word_tokenizer(tmp_path)
    model = encdec.load_pretrained(tmp_path)
    text = "w5 w17 w40 w8 w33"
    ids = model.tokenizer(text)["input_ids"]
    assert ids[-1] == 1 and len(ids) == 6  # words + EOS
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), generation_config=hf_generation_config(hf, 10, 1))
    expected = model.tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=True)
    assert expected.startswith("w")  # real words, not an empty string that any bug would match
    ours = encdec.reference_generate(model, [text], 10)[0]
    assert ours.text == expected
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "encdec.cli",
            "generate",
            "--model",
            str(tmp_path),
            "--input",
            text,
            "--max-new-tokens",
            "10",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cli.stdout.strip() == expected


def test_generate_command_reports_a_bad_directory(tmp_path):
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "encdec.cli",
            "generate",
            "--model",
            str(tmp_path / "missing"),
            "--input",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "does not exist" in cli.stderr
