"""``transcribe`` (the dense reference) on the tiny model: batching, long audio, errors."""

import wave

import numpy as np
import pytest

import encdec
from encdec.whisper.audio import SAMPLE_RATE, log_mel_spectrogram
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import greedy_decode, transcribe
from tests.whisper.tiny_whisper import MEL_BINS, PROMPT


@pytest.fixture(scope="module")
def model(tiny_ct2_dir):
    return encdec.load_pretrained(tiny_ct2_dir)


def _tone(seconds, freq, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _wav(path, samples):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes((samples * 32767).astype("<i2").tobytes())
    return str(path)


def test_batch_rows_do_not_affect_each_other(model):
    clips = [_tone(2.0, 300, 1), _tone(5.0, 900, 2), _tone(1.0, 2000, 3)]
    together = transcribe(model, clips, max_new_tokens=12, batch_size=3, encoder_batch=2)
    alone = [transcribe(model, [c], max_new_tokens=12)[0] for c in clips]
    assert [t.token_ids for t in together] == [t.token_ids for t in alone]
    assert len({tuple(t.token_ids) for t in together}) > 1  # different audio, different tokens
    assert [t.audio_seconds for t in together] == [2.0, 5.0, 1.0]


def test_long_audio_is_decoded_window_by_window(model):
    first, second = _tone(30.0, 300, 1), _tone(7.0, 900, 2)
    (long,) = transcribe(model, [np.concatenate([first, second])], max_new_tokens=10)
    tokens = WhisperTokens.from_dir(model.path)
    mel = np.stack([log_mel_spectrogram(first, MEL_BINS), log_mel_spectrogram(second, MEL_BINS)])
    windows, stopped = greedy_decode(model, mel, tokens, PROMPT, max_new_tokens=10)
    assert long.token_ids == windows[0] + windows[1]
    assert long.finish_reason == ("stop" if stopped.all() else "length")
    assert long.audio_seconds == pytest.approx(37.0)


def test_bad_requests_are_clear_errors(model):
    with pytest.raises(ValueError, match="language 'xx' is not one of the model's: de, en"):
        transcribe(model, [_tone(1.0, 300)], language="xx")
    with pytest.raises(ValueError, match="exceeds the decoder's 40 positions"):
        transcribe(model, [_tone(1.0, 300)], max_new_tokens=37)
    with pytest.raises(ValueError, match="is empty"):
        transcribe(model, [np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="no audio"):
        transcribe(model, [])
