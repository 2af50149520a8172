"""The host side of audio requests (Whisper): inputs to log-mel windows, prompts, suppression.

An engine whose model reads audio (``ModelConfig.is_audio``) takes every ``Request.inputs`` as
audio (see :class:`~encdec.engine.request.AudioInput`). At submit, :meth:`AudioFrontEnd.prepare`
reads and resamples it and computes its log-mel window ``[C, A]``; any :class:`AudioError`
becomes a :class:`RequestError` for that request alone. The encoder then runs on one bucket of
``audio_positions`` (1,500) positions with no padding mask, and each request takes that many
cross positions in the cross page pool.

Whisper's decoder prompt becomes the request's forced decoder prefix, and its
``suppress_tokens`` / ``begin_suppress_tokens`` become two static vocabulary masks that the
decode step applies before sampling (:attr:`AudioFrontEnd.masks`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.engine.request import AudioInput, RequestError
from encdec.whisper.audio import (
    CHUNK_SECONDS,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel_spectrogram,
)
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import default_max_new_tokens


@dataclasses.dataclass(frozen=True)
class PreparedAudio:
    mel_CA: np.ndarray
    """One log-mel window (float32)."""
    seconds: float
    prompt: list[int]
    """Whisper's decoder prompt for the input's language and task."""


def as_audio_input(inputs: Any) -> AudioInput:
    """``Request.inputs`` of an audio model as an :class:`AudioInput`."""
    if isinstance(inputs, AudioInput):
        return inputs
    if isinstance(inputs, (str, os.PathLike)):
        return AudioInput(os.fspath(inputs))
    if isinstance(inputs, np.ndarray | jax.Array):
        return AudioInput(np.asarray(inputs))
    raise RequestError(
        "this model reads audio: inputs must be an AudioInput, a WAV path or a 1-D float array of "
        f"16 kHz samples, got {type(inputs).__name__}"
    )


class AudioFrontEnd:
    """What an engine needs to serve one Whisper model's audio requests."""

    def __init__(self, model: Model, tokens: WhisperTokens | None = None):
        cfg = model.config
        if not cfg.is_audio:
            raise ValueError(f"{cfg.model_type} has no audio encoder")
        self.config = cfg
        self.tokens = tokens or WhisperTokens.from_dir(model.path)
        every_V, first_V = self.tokens.suppression_masks(cfg.decoder_vocab_size)
        self.masks = {"suppress_V": every_V, "suppress_first_V": first_V}
        """Keyword arguments of ``decode_steps``: banned at every sampled step / at the first."""

    @property
    def default_prompt_len(self) -> int:
        return len(self.tokens.prompt())

    @property
    def mel_shape(self) -> tuple[int, int]:
        return (self.config.num_mel_bins, 2 * self.config.audio_positions)

    def max_new_tokens(self, prompt_len: int) -> int:
        """The model's limit, as ``transcribe``'s and CTranslate2's: ``min(P / 2, P - prompt)``."""
        return default_max_new_tokens(self.config, prompt_len)

    def prepare(self, inputs: Any) -> PreparedAudio:
        """Read, resample and featurize one request's audio; bad audio raises :class:`RequestError`."""
        audio = as_audio_input(inputs)
        try:
            samples = load_audio(audio.source, audio.sample_rate)
            if samples.size > N_SAMPLES:
                raise AudioError(
                    f"audio is {samples.size / SAMPLE_RATE:.2f} s, longer than one {CHUNK_SECONDS} s "
                    "Whisper window: submit one request per window (encdec.whisper.audio.split_windows), "
                    "as `encdec transcribe` does"
                )
            mel_CA = log_mel_spectrogram(samples, self.config.num_mel_bins)
        except ValueError as e:  # AudioError, or a sample rate given with a WAV path
            raise RequestError(str(e)) from e
        try:
            prompt = self.tokens.prompt(audio.language, audio.task)
        except ValueError as e:
            raise RequestError(str(e)) from e
        return PreparedAudio(mel_CA, samples.size / SAMPLE_RATE, prompt)

    def text(self, tokenizer: Any, token_ids: list[int]) -> str | None:
        """The transcript of generated tokens (special tokens and ``<|endoftext|>`` dropped)."""
        return None if tokenizer is None else self.tokens.decode(tokenizer, token_ids)
