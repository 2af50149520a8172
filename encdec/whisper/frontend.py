"""Whisper's front end for the engine: audio in, log-mel windows, prompts, suppression masks.

An engine built with :class:`WhisperFrontEnd` (``encdec.whisper.whisper_engine``) takes every
``Request.inputs`` as audio (an :class:`AudioInput`, a WAV path, or a 1-D float array of 16 kHz
samples). At submit, :meth:`WhisperFrontEnd.prepare` checks its length (from a WAV header before
anything is decoded), reads and resamples it and computes its log-mel window ``[C, A]``; any
problem is a :class:`~encdec.engine.RequestError` for that request alone. The encoder then runs
on one bucket of ``audio_positions`` (1,500) positions with no padding mask, and each request
takes that many cross positions in the cross page pool.

Whisper's decoder prompt becomes the request's forced decoder prefix, and its
``suppress_tokens`` / ``begin_suppress_tokens`` become the two vocabulary masks the decode step
applies before sampling (:attr:`WhisperFrontEnd.masks`). Its timestamp rules and the language
detection step are the on-device logits hook (:attr:`WhisperFrontEnd.logits_processor`,
:mod:`encdec.whisper.rules`); a request's prompt says which applies.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.engine import EngineConfig, Prepared, Request, RequestError
from encdec.engine.validation import FieldError, Int, OneOf, Text, check_fields, rule
from encdec.models.whisper import encode_audio
from encdec.sampling import TokenMasks
from encdec.whisper.audio import (
    CHUNK_SECONDS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    PADDINGS,
    SAMPLE_RATE,
    AudioTooLong,
    load_audio,
    log_mel_spectrogram,
)
from encdec.whisper.rules import WhisperRules
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import default_max_new_tokens


@dataclasses.dataclass
class AudioInput:
    """Audio for a Whisper engine: at most one 30 s window.

    Unreadable, empty or longer than 30 s audio fails that request alone with a
    :class:`~encdec.engine.RequestError`. Split longer audio into one request per window
    (``encdec.whisper.audio.split_windows``), as ``encdec transcribe`` does.
    """

    source: str | os.PathLike | Any
    """A WAV path, or float samples in [-1, 1] (``[n]`` or ``[n, channels]``, e.g. a numpy array)."""
    sample_rate: int | None = rule(Int(MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, optional=True), None)
    """Rate of an array ``source`` (None: 16 kHz); a WAV file's rate is read from its header."""
    language: str = rule(Text(), "en")
    """Spoken language, for the model's default decoder prompt (``<|en|>``)."""
    task: str = rule(OneOf(("transcribe", "translate")), "transcribe")
    """``transcribe`` or ``translate`` (into English), for the default decoder prompt."""
    padding: str = rule(OneOf(PADDINGS), "audio")
    """How audio under 30 s is padded: ``audio`` (silence before the log-mel) or ``features``
    (zero log-mel frames, as long-form transcription does; see ``log_mel_spectrogram``)."""


def as_audio_input(inputs: Any) -> AudioInput:
    """``Request.inputs`` of an audio model as a checked :class:`AudioInput`."""
    if isinstance(inputs, str | os.PathLike):
        inputs = AudioInput(os.fspath(inputs))
    elif isinstance(inputs, np.ndarray | jax.Array):
        inputs = AudioInput(np.asarray(inputs))
    if not isinstance(inputs, AudioInput):
        raise RequestError(
            "this model reads audio: inputs must be an AudioInput, a WAV path or a 1-D float array of "
            f"16 kHz samples, got {type(inputs).__name__}"
        )
    try:
        check_fields(inputs, "AudioInput.")
    except FieldError as e:
        raise RequestError(str(e)) from None
    return inputs


def encode_mel(params, cfg, mel_bCA: jax.Array, encoder_len_b: jax.Array, *, dtype, lora=None) -> jax.Array:
    """Whisper's encoder over full 30 s windows (every row has all positions: no mask)."""
    del encoder_len_b
    return encode_audio(params, cfg, mel_bCA, dtype=dtype, lora=lora)


class WhisperFrontEnd:
    """What an engine needs to serve one Whisper model's audio requests.

    ``tokens`` overrides the special tokens and suppression lists read from the model's directory;
    ``max_initial_timestamp`` (seconds) bounds a window's first timestamp (None: no bound).
    """

    encode = staticmethod(encode_mel)

    def __init__(
        self, model: Model, tokens: WhisperTokens | None = None, *, max_initial_timestamp: float | None = 1.0
    ):
        cfg = model.config
        if not cfg.is_audio:
            raise ValueError(f"{cfg.model_type} has no audio encoder")
        self.model_config = cfg
        self.tokenizer = model.tokenizer
        self.tokens = tokens or WhisperTokens.from_dir(model.path)
        self.logits_processor = WhisperRules.from_tokens(self.tokens, max_initial_timestamp)
        # <|nospeech|> is banned by the hook once a row samples, not by the static mask, so a
        # prompt's log-probabilities can report it (see encdec.whisper.rules).
        every_V, first_V = self.tokens.suppression_masks(cfg.decoder_vocab_size)
        if self.logits_processor.no_speech is not None:
            every_V = every_V.at[self.logits_processor.no_speech].set(False)
            first_V = first_V.at[self.logits_processor.no_speech].set(False)
        self.masks = TokenMasks(every_V, first_V)
        self.default_prefix_len = len(self.tokens.prompt())

    @property
    def mel_shape(self) -> tuple[int, int]:
        return (self.model_config.num_mel_bins, 2 * self.model_config.audio_positions)

    def encoder_buckets(self, config: EngineConfig) -> tuple[int, ...]:
        return (self.model_config.audio_positions,)

    def prepare(self, request: Request, config: EngineConfig) -> Prepared:
        audio = as_audio_input(request.inputs)
        try:
            samples = load_audio(audio.source, audio.sample_rate, max_seconds=CHUNK_SECONDS)
            mel_CA = log_mel_spectrogram(samples, self.model_config.num_mel_bins, audio.padding)
            prompt = self.tokens.prompt(audio.language, audio.task)
        except AudioTooLong as e:
            raise RequestError(
                f"audio is {e.seconds:.2f} s, longer than one {CHUNK_SECONDS} s Whisper window: submit one "
                "request per window (encdec.whisper.audio.split_windows), as `encdec transcribe` does"
            ) from None
        except ValueError as e:  # AudioError, an unknown language, a sample rate given with a WAV path
            raise RequestError(str(e)) from None
        prefix = tuple(request.decoder_prefix or prompt)
        asked = config.max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        max_new = min(asked, default_max_new_tokens(self.model_config, len(prefix)))
        return Prepared(
            mel_CA,
            self.model_config.audio_positions,
            prefix,
            max_new,
            audio_seconds=samples.size / SAMPLE_RATE,
        )

    def encoder_batch(self, bucket: int, rows: int, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.zeros((rows, *self.mel_shape), np.float32)
        for r, mel_CA in enumerate(inputs):
            batch[r] = mel_CA
        return batch

    def text(self, prepared: Prepared, token_ids: Sequence[int]) -> str | None:
        """The transcript (special tokens and ``<|endoftext|>`` dropped); None without a tokenizer."""
        return None if self.tokenizer is None else self.tokens.decode(self.tokenizer, token_ids)
