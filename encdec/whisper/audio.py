"""Audio in: audio files, resampling to 16 kHz, Whisper's log-mel front end.

PCM WAV files are read with the standard library (``wave``) and resampled here; every other
file (mp3, flac, ogg/opus, m4a/aac, float WAV, video containers: whatever FFmpeg decodes) through
PyAV (the ``audio`` extra), which also resamples to 16 kHz mono. Either way the length comes from
the file's header before anything is decoded, so a too-long file is refused at once.

The log-mel numerics are Whisper's reference (and ``transformers.WhisperFeatureExtractor``'s):
a periodic Hann window of 400 samples, hop 160, centred frames with reflect padding, power
spectrum, Slaney-normalised Slaney-scale mel filters up to 8 kHz, ``log10`` floored at 1e-10,
clamped to 8 below the clip's maximum, then ``(x + 4) / 4``. Every window is 30 s (silence-padded),
3,000 frames. Longer audio is split into consecutive 30 s windows by :func:`split_windows`
(the caller transcribes each and joins the text); :func:`log_mel_spectrogram` itself refuses
more than 30 s rather than silently truncating.
"""

from __future__ import annotations

import functools
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, not convertible to 16 kHz mono, too long."""


class AudioTooLong(AudioError):
    """Audio longer than a caller's limit, found from its length before it is decoded."""

    def __init__(self, name: str, seconds: float, limit: float):
        self.seconds = seconds
        super().__init__(f"{name} is {seconds:.2f} s long, over the {limit:g} s limit")


def read_wav(path: str | Path, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the file's sample rate (PCM 8/16/24/32-bit; channels averaged).

    ``max_seconds``: refuse longer audio (:class:`AudioTooLong`) from the header, before reading it.
    """
    path = Path(path)
    if not path.is_file():
        kind = " as a regular file" if path.exists() else ""  # a FIFO or a folder would block or fail
        raise AudioError(f"audio file {path} does not exist{kind}")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            if max_seconds is not None and rate > 0 and f.getnframes() / rate > max_seconds:
                raise AudioTooLong(str(path), f.getnframes() / rate, max_seconds)
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise AudioError(f"cannot read {path} as a PCM WAV file: {e}") from e
    if width not in (1, 2, 3, 4) or channels < 1:
        raise AudioError(f"{path}: unsupported WAV layout ({channels} channel(s), {8 * width}-bit samples)")
    frame_bytes = width * channels
    raw = raw[: len(raw) - len(raw) % frame_bytes]  # a truncated file keeps its whole frames
    if not raw:
        raise AudioError(f"{path} holds no audio samples")
    samples = _pcm_to_float(raw, width).reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples, rate


def _is_pcm_wav(path: Path) -> bool:
    """A RIFF/WAVE file in a format the standard library reads (integer PCM)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return False
        with wave.open(str(path), "rb"):
            return True
    except (wave.Error, EOFError, OSError):
        return False


def _pyav() -> Any:
    try:
        import av
    except ImportError:
        raise AudioError(
            "reading this file needs PyAV (pip install av, or encdec's `audio` extra); "
            "without it only PCM WAV files are read"
        ) from None
    return av


def read_audio_file(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """16 kHz mono float32 samples of any audio file: PCM WAV here, anything else through PyAV.

    ``max_seconds``: refuse longer audio (:class:`AudioTooLong`) from the header, before decoding.
    """
    path = Path(path)
    if not path.is_file():
        kind = " as a regular file" if path.exists() else ""
        raise AudioError(f"audio file {path} does not exist{kind}")
    if path.stat().st_size == 0:
        raise AudioError(f"{path} is empty (0 bytes)")
    if _is_pcm_wav(path):
        samples, rate = read_wav(path, max_seconds)
        return resample(samples, rate)
    av = _pyav()
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            seconds = _header_seconds(container, stream)
            if max_seconds is not None and seconds is not None and seconds > max_seconds:
                raise AudioTooLong(str(path), seconds, max_seconds)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pieces = []
            for frame in container.decode(stream):
                pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except AudioError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise AudioError(f"cannot decode {path} as audio: {e}") from None
    samples = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioError(f"{path} holds no audio samples")
    if max_seconds is not None and samples.size / SAMPLE_RATE > max_seconds:  # a header that lied
        raise AudioTooLong(str(path), samples.size / SAMPLE_RATE, max_seconds)
    return samples


def _header_seconds(container: Any, stream: Any) -> float | None:
    """Duration from the stream's or the container's header, if either states one."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24 bits
        return ints.astype(np.float32) / float(1 << 23)
    dtype = {2: np.dtype("<i2"), 4: np.dtype("<i4")}[width]
    return np.frombuffer(raw, dtype).astype(np.float32) / float(1 << (8 * width - 1))


def resample(
    samples: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE, *, zero_crossings: int = 16
):
    """Band-limited resampling: Kaiser-windowed sinc interpolation, low-passed below both Nyquists.

    Integer rates make the output's fractional input positions repeat with period ``up =
    target / gcd``; those phases' taps are computed once (polyphase) when there are few of them.
    """
    if not MIN_SAMPLE_RATE <= orig_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"sample rate {orig_rate} Hz cannot be converted to {target_rate} Hz "
            f"(supported: {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)"
        )
    x = np.asarray(samples, np.float64)
    if orig_rate == target_rate:
        return x.astype(np.float32)
    g = math.gcd(orig_rate, target_rate)
    up, down = target_rate // g, orig_rate // g
    n_out = int(round(len(x) * up / down))
    cutoff = min(1.0, up / down)  # fraction of the input Nyquist that survives
    half = int(np.ceil(zero_crossings / cutoff))
    offsets = np.arange(-half + 1, half + 1)
    padded = np.pad(x, (half, half + 1))
    table = _sinc_taps(np.arange(up)[:, None] / up - offsets[None, :], half, cutoff) if up <= 4096 else None
    out = np.empty(n_out, np.float64)
    for start in range(0, n_out, 16_384):
        j = np.arange(start, min(start + 16_384, n_out))
        base, phase = np.divmod(j * down, up)
        idx = base[:, None] + offsets[None, :] + half
        taps = (
            table[phase]
            if table is not None
            else _sinc_taps(phase[:, None] / up - offsets[None, :], half, cutoff)
        )
        out[j] = np.einsum("jk,jk->j", padded[idx], taps)
    return out.astype(np.float32)


def _sinc_taps(dist: np.ndarray, half: int, cutoff: float, beta: float = 8.6) -> np.ndarray:
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, None))) / np.i0(beta)
    return cutoff * np.sinc(cutoff * dist) * window


def load_audio(
    source: str | Path | np.ndarray, sample_rate: int | None = None, *, max_seconds: float | None = None
) -> np.ndarray:
    """16 kHz mono float32 samples from an audio file or an array (``sample_rate`` defaults to 16 kHz).

    Arrays are float samples in [-1, 1], ``[n]`` or ``[n, channels]``. Empty, non-finite or
    unconvertible audio raises :class:`AudioError`; audio over ``max_seconds`` raises
    :class:`AudioTooLong` before it is decoded or resampled. Without a limit any length is
    returned; see :func:`split_windows` for > 30 s.
    """
    if isinstance(source, (str, Path)):
        if sample_rate is not None:
            raise ValueError("sample_rate is read from the file's header; pass it only with an array")
        samples = read_audio_file(source, max_seconds)
        if not np.all(np.isfinite(samples)):
            raise AudioError(f"{source} has non-finite samples (NaN or inf)")
        return samples
    samples, name = np.asarray(source), "audio array"
    rate = SAMPLE_RATE if sample_rate is None else sample_rate
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.number):
        raise AudioError(
            f"{name} must be a numeric [samples] or [samples, channels] array, got {samples.shape}"
        )
    if samples.size == 0:
        raise AudioError(f"{name} is empty")
    if max_seconds is not None and rate > 0 and samples.size / rate > max_seconds:
        raise AudioTooLong(name, samples.size / rate, max_seconds)
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{name} has non-finite samples (NaN or inf)")
    out = resample(samples, int(rate))
    if out.size == 0:
        raise AudioError(f"{name} is shorter than one sample at {SAMPLE_RATE} Hz")
    return out


def split_windows(samples: np.ndarray) -> list[np.ndarray]:
    """Consecutive 30 s windows of 16 kHz audio (the last one shorter); words at a cut may be lost."""
    if len(samples) == 0:
        raise AudioError("audio is empty")
    return [samples[i : i + N_SAMPLES] for i in range(0, len(samples), N_SAMPLES)]


def _hz_to_mel(hz):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) / log_step)


def _mel_to_hz(mel):
    mel = np.asarray(mel, np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``[n_fft // 2 + 1, n_mels]`` triangular filters with Slaney's area normalisation."""
    fft_hz = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (fft_hz[:, None] - lower[None]) / (centre - lower)[None]
    falling = (upper[None] - fft_hz[:, None]) / (upper - centre)[None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (upper - lower)[None]
    weights.setflags(write=False)
    return weights


PADDINGS = ("audio", "features")


def log_mel_spectrogram(samples: np.ndarray, n_mels: int = 80, padding: str = "audio") -> np.ndarray:
    """Whisper's features ``[n_mels, 3000]`` (float32) for up to 30 s of 16 kHz audio.

    ``padding``: how a window under 30 s is filled: ``"audio"`` with silent samples before the
    transform (HF's feature extractor, openai-whisper's one-window ``decode``), ``"features"``
    with zeros after it (openai-whisper's and faster-whisper's long-form transcription, which
    slice a longer spectrogram and zero-pad the slice).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    samples = np.asarray(samples, np.float64)
    if samples.ndim != 1 or samples.size == 0:
        raise AudioError(f"expected non-empty 1-D 16 kHz samples, got shape {samples.shape}")
    if samples.size > N_SAMPLES:
        raise AudioError(
            f"audio is {samples.size / SAMPLE_RATE:.2f} s; one Whisper window holds {CHUNK_SECONDS} s "
            "(split it with split_windows)"
        )
    x = np.pad(samples, (0, N_SAMPLES - samples.size))
    x = np.pad(x, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = power[:-1] @ mel_filters(n_mels)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    features = (log_spec + 4.0) / 4.0
    if padding == "features":
        features[samples.size // HOP_LENGTH :] = 0.0
    return np.ascontiguousarray(features.T, dtype=np.float32)


def features_for(
    source: str | Path | np.ndarray, n_mels: int = 80, sample_rate: int | None = None, padding: str = "audio"
):
    """Log-mel windows ``[windows, n_mels, 3000]`` and the audio's length in seconds."""
    samples = load_audio(source, sample_rate)
    windows = [log_mel_spectrogram(w, n_mels, padding) for w in split_windows(samples)]
    return np.stack(windows), samples.size / SAMPLE_RATE
