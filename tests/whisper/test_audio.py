"""Audio files (WAV here, other formats through PyAV), resampling and the log-mel front end
(against ``transformers.WhisperFeatureExtractor``)."""

import struct
import wave

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from encdec.whisper.audio import (
    N_SAMPLES,
    AudioError,
    AudioTooLong,
    features_for,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    read_wav,
    resample,
    split_windows,
)


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp with harmonics, silence and noise: a spread of mel energies and a real floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    x = 0.3 * np.sin(2 * np.pi * (120 + 400 * t) * t) + 0.1 * np.sin(2 * np.pi * 2500 * t)
    x *= np.sin(2 * np.pi * 0.7 * t) > -0.3  # gaps of silence
    return (x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("seconds, n_mels", [(1.0, 80), (7.3, 80), (30.0, 80), (4.2, 128)])
def test_log_mel_matches_hf_feature_extractor(seconds, n_mels):
    audio = _speechlike(seconds)
    ref = WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=16_000, return_tensors="np")
    ours = log_mel_spectrogram(audio, n_mels)
    assert ours.shape == (n_mels, 3000) and ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, ref.input_features[0], atol=1e-4, rtol=0)


def test_feature_padding_zeroes_the_frames_past_the_audio():
    """Long-form windows are padded as openai-whisper's ``transcribe`` pads a spectrogram slice."""
    x = _speechlike(7.3)
    audio_padded, feature_padded = log_mel_spectrogram(x), log_mel_spectrogram(x, padding="features")
    content = x.size // 160
    np.testing.assert_array_equal(feature_padded[:, :content], audio_padded[:, :content])
    assert not feature_padded[:, content:].any() and (audio_padded[:, content + 2 :] < -0.5).all()


def test_mel_filters_match_hf():
    np.testing.assert_allclose(mel_filters(80), WhisperFeatureExtractor().mel_filters, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000, 16_000])
def test_resampled_tone_is_the_tone(rate):
    t_in = np.arange(rate) / rate
    out = resample(np.sin(2 * np.pi * 440 * t_in), rate)
    assert out.size == 16_000
    t_out = np.arange(out.size) / 16_000
    np.testing.assert_allclose(out[200:-200], np.sin(2 * np.pi * 440 * t_out[200:-200]), atol=1e-4)


def test_resampling_removes_what_16khz_cannot_hold():
    tone = np.sin(2 * np.pi * 10_000 * np.arange(44_100) / 44_100)  # above the 8 kHz Nyquist
    assert np.abs(resample(tone, 44_100)[200:-200]).max() < 1e-3


def _write_wav(path, samples_NC, width=2, rate=16_000):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples_NC.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        scale = float(1 << (8 * width - 1)) - 1
        ints = np.round(samples_NC * scale).astype(np.int64)
        if width == 1:
            raw = (ints + 128).astype(np.uint8).tobytes()
        elif width == 3:
            raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.ravel())
        else:
            raw = ints.astype(f"<i{width}").tobytes()
        f.writeframes(raw)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_pcm_widths_and_channels(tmp_path, width):
    left = np.linspace(-0.5, 0.5, 101)
    stereo = np.stack([left, -0.5 * left], axis=1)
    _write_wav(tmp_path / "x.wav", stereo, width=width, rate=22_050)
    samples, rate = read_wav(tmp_path / "x.wav")
    assert rate == 22_050 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, stereo.mean(axis=1), atol=2.0 / (1 << (8 * width - 1)))


def test_long_audio_is_split_into_30s_windows(tmp_path):
    _write_wav(tmp_path / "long.wav", _speechlike(65.0)[:, None])
    mel, seconds = features_for(tmp_path / "long.wav")
    assert mel.shape == (3, 80, 3000) and seconds == pytest.approx(65.0)
    assert [w.size for w in split_windows(np.zeros(2 * N_SAMPLES + 5))] == [N_SAMPLES, N_SAMPLES, 5]
    with pytest.raises(AudioError, match="30.00.* one Whisper window holds 30 s"):
        log_mel_spectrogram(np.zeros(N_SAMPLES + 1))


def test_empty_audio_is_a_clear_error(tmp_path):
    _write_wav(tmp_path / "empty.wav", np.zeros((0, 1)))
    with pytest.raises(AudioError, match="holds no audio samples"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="is empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioError):
        log_mel_spectrogram(np.zeros(0))


def test_unreadable_or_unconvertible_audio_is_a_clear_error(tmp_path):
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(AudioError, match="cannot decode .*noise.wav as audio"):
        load_audio(tmp_path / "noise.wav")
    (tmp_path / "notes.mp3").write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match="cannot decode .*notes.mp3 as audio"):
        load_audio(tmp_path / "notes.mp3")
    (tmp_path / "zero.flac").write_bytes(b"")
    with pytest.raises(AudioError, match=r"zero.flac is empty \(0 bytes\)"):
        load_audio(tmp_path / "zero.flac")
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    _write_wav(tmp_path / "slow.wav", np.zeros((100, 1)), rate=500)
    with pytest.raises(AudioError, match="500 Hz cannot be converted to 16000 Hz"):
        load_audio(tmp_path / "slow.wav")
    with pytest.raises(AudioError, match="non-finite"):
        load_audio(np.array([0.0, np.nan, 0.1]))
    with pytest.raises(AudioError, match="numeric"):
        load_audio(np.zeros((2, 2, 2)))


def test_float_wav_is_read_through_pyav(tmp_path):
    """IEEE-float WAV (format 3): the standard library reads PCM only, PyAV reads the rest."""
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(1600) / 16_000)).astype("<f4")
    fmt = struct.pack("<HHIIHH", 3, 1, 16_000, 64_000, 4, 32)
    data = x.tobytes()
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    body = b"WAVE" + chunks
    (tmp_path / "float.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    np.testing.assert_allclose(load_audio(tmp_path / "float.wav"), x, atol=1e-6)


def _encode(path, samples, rate, codec, fmt=None):
    """Write 16 kHz samples with PyAV (FFmpeg's encoders) at ``rate``."""
    import av

    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format, layout="mono", rate=rate)
        frame = av.AudioFrame.from_ndarray(samples[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = 16_000
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


FORMATS = [
    ("a.mp3", "mp3", 44_100, None),
    ("a.flac", "flac", 22_050, None),
    ("a.ogg", "libopus", 48_000, None),
    ("a.m4a", "aac", 48_000, "ipod"),
]


@pytest.mark.parametrize("name, codec, rate, fmt", FORMATS)
def test_compressed_formats_are_read(tmp_path, name, codec, rate, fmt):
    pytest.importorskip("av")
    t = np.arange(int(2.5 * 16_000)) / 16_000
    tone = 0.4 * np.sin(2 * np.pi * 700 * t) * (t > 0.5)  # 0.5 s of silence, then 700 Hz
    _encode(tmp_path / name, tone, rate, codec, fmt)
    got = load_audio(tmp_path / name)
    assert got.dtype == np.float32 and abs(got.size / 16_000 - 2.5) < 0.1  # encoder padding aside
    spectrum = np.abs(np.fft.rfft(got[16_000:32_000]))
    assert abs(np.argmax(spectrum) - 700) <= 2  # 1 Hz bins over one second
    assert np.sqrt(np.mean(got[:6_000] ** 2)) < 0.02 < np.sqrt(np.mean(got[16_000:32_000] ** 2))
    with pytest.raises(AudioTooLong, match="2.5.* over the 2 s limit"):
        load_audio(tmp_path / name, max_seconds=2)
