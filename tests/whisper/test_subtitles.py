"""Subtitle and transcript files, read back by independent parsers (``srt``, ``webvtt-py``)."""

import json

import pytest

from encdec.whisper.segments import Segment, Transcription
from encdec.whisper.subtitles import OutputDirError, check_output_dir, timestamp, write_transcription

srt = pytest.importorskip("srt")
webvtt = pytest.importorskip("webvtt")


def _transcription():
    segments = [
        Segment(0.0, 2.345, " In the beginning.", [1, 2], avg_logprob=-0.2, compression_ratio=1.1),
        Segment(2.345, 3661.5, "Two lines\n\nand an arrow --> here", [3], no_speech_prob=0.01),
        Segment(3700.0, 3701.25, "   ", [4]),  # empty text: no cue
        Segment(3702.0, 3703.0, "Ünïcödé, «quoted».", [5], temperature=0.2),
    ]
    return Transcription("dir/talk.m4a", segments, language="en", duration=3710.0)


def test_timestamps():
    assert timestamp(0) == "00:00:00,000"
    assert timestamp(3661.5) == "01:01:01,500"
    assert timestamp(59.9996, ".") == "00:01:00.000"


def test_srt_reads_back(tmp_path):
    path = write_transcription(_transcription(), tmp_path, "srt")
    assert path == tmp_path / "talk.srt"
    cues = list(srt.parse(path.read_text(encoding="utf-8")))
    assert [c.index for c in cues] == [1, 2, 3]
    assert [(c.start.total_seconds(), c.end.total_seconds()) for c in cues] == [
        (0.0, 2.345),
        (2.345, 3661.5),
        (3702.0, 3703.0),
    ]
    texts = ["In the beginning.", "Two lines\nand an arrow -> here", "Ünïcödé, «quoted»."]
    assert [c.content for c in cues] == texts


def test_vtt_reads_back(tmp_path):
    path = write_transcription(_transcription(), tmp_path, "vtt", name="other")
    assert path.name == "other.vtt"
    cues = webvtt.read(str(path))
    assert [(c.start, c.end) for c in cues] == [
        ("00:00:00.000", "00:00:02.345"),
        ("00:00:02.345", "01:01:01.500"),
        ("01:01:42.000", "01:01:43.000"),
    ]
    assert [c.text for c in cues][1] == "Two lines\nand an arrow -> here"


def test_json_and_txt(tmp_path):
    data = json.loads(write_transcription(_transcription(), tmp_path, "json").read_text(encoding="utf-8"))
    assert data["language"] == "en" and data["duration"] == 3710.0
    assert [s["start"] for s in data["segments"]] == [0.0, 2.345, 3700.0, 3702.0]
    assert data["segments"][0]["avg_logprob"] == -0.2 and data["segments"][0]["tokens"] == [1, 2]
    txt = write_transcription(_transcription(), tmp_path, "txt").read_text(encoding="utf-8")
    assert txt.splitlines() == ["In the beginning.", "Two lines and an arrow --> here", "Ünïcödé, «quoted»."]


def test_an_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="cannot write to output directory .*a-file/out"):
        check_output_dir(blocker / "out")
    assert check_output_dir(tmp_path / "new" / "dir").is_dir()
