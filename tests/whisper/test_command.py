"""``encdec transcribe`` on a tiny random Whisper: formats in, subtitles out, errors one by one."""

import json

import numpy as np
import pytest

from encdec.cli import main
from tests.whisper.test_audio import _encode
from tests.whisper.test_longform import _bursts, _wav

srt = pytest.importorskip("srt")
webvtt = pytest.importorskip("webvtt")
GREEDY = ["--beam-size", "1", "--temperature-increment-on-fallback", "0", "--num-slots", "4"]
FAST = ["--language", "en", *GREEDY]  # the compiled steps of test_longform's engine


@pytest.fixture()
def files(tmp_path):
    good = _wav(tmp_path / "good.wav", _bursts([(0.5, 0), (3.0, 500), (0.6, 0), (2.0, 900)], 1))
    flac = tmp_path / "good.flac"  # the same name: its outputs are good-2.*
    _encode(flac, _bursts([(2.5, 700)], 2), 22_050, "flac")
    (tmp_path / "notes.mp3").write_text("not audio\n" * 30)
    (tmp_path / "empty.wav").write_bytes(b"")
    silent = _wav(tmp_path / "silent.wav", np.zeros(2 * 16_000))
    return [good, str(flac), str(tmp_path / "notes.mp3"), str(tmp_path / "empty.wav"), silent]


def test_subtitles_for_good_files_clear_errors_for_bad_ones(tiny_longform_ct2_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["transcribe", *files, "--model", str(tiny_longform_ct2_dir), "--output-dir", str(out)]
    assert main([*args, *FAST, "--output-format", "srt"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "notes.mp3: cannot decode" in err and "empty.wav: " in err and "is empty (0 bytes)" in err
    assert "silent.wav: " in err and "is silent: no speech found" in err
    assert "2 of 5 file(s)" in err
    lines = captured.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == files[:2]
    assert sorted(p.name for p in out.iterdir()) == ["good-2.srt", "good.srt"]
    for name in ("good.srt", "good-2.srt"):
        cues = list(srt.parse((out / name).read_text()))
        assert cues and all(c.start < c.end for c in cues)
        assert [c.start for c in cues] == sorted(c.start for c in cues)
    assert main([*args[:3], *args[6:], *FAST, "--output-format", "vtt"]) == 0
    cues = webvtt.read(str(out / "good.vtt"))
    assert len(cues) == len(list(srt.parse((out / "good.srt").read_text())))


def test_language_is_detected_when_not_given(tiny_longform_ct2_dir, files, tmp_path, capsys):
    out = tmp_path / "json"
    args = ["transcribe", files[0], "--model", str(tiny_longform_ct2_dir), "--output-format", "json"]
    assert main([*args, "--output-dir", str(out), *GREEDY]) == 0
    data = json.loads((out / "good.json").read_text())
    assert data["language"] in ("en", "de") and set(data["language_probs"]) <= {"en", "de"}
    assert data["segments"] and {"start", "end", "text", "avg_logprob", "tokens"} <= set(data["segments"][0])


def test_bad_options_stop_before_any_audio_is_read(tiny_longform_ct2_dir, files, tmp_path, capsys):
    model = ["--model", str(tiny_longform_ct2_dir)]
    assert main(["transcribe", files[0], *model, "--language", "xx"]) == 2
    assert "language 'xx' is not one of the model's: de, en" in capsys.readouterr().err
    assert main(["transcribe", files[0], *model, "--initial-prompt", "Jehoshaphat"]) == 2
    assert "a text prompt needs the model's tokenizer; this model has none" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["transcribe", files[0], *model, *FAST, "--output-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to output directory" in err and "good.wav" not in err
