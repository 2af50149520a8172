"""Greedy Whisper transcription over a dense cache: the reference the engine's audio path matches.

The decoder prompt is ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``; every step
suppresses the model's ``suppress_tokens`` and the first step also its ``begin_suppress_tokens``
(blank and ``<|endoftext|>``), as Whisper and CTranslate2 do. Decoding stops at ``<|endoftext|>``
or after ``max_new_tokens``, by default CTranslate2's ``min(P / 2, P - prompt)`` for ``P``
decoder positions (224 for Whisper's 448). Audio over 30 s is split into 30 s windows, each
decoded as its own row, and the window texts are joined (words cut at a boundary may be lost).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.config import ModelConfig
from encdec.generate import dense_decode
from encdec.models.whisper import encode_audio
from encdec.sampling import TokenMasks
from encdec.whisper.audio import features_for
from encdec.whisper.tokens import WhisperTokens


def default_max_new_tokens(cfg: ModelConfig, prompt_len: int) -> int:
    """CTranslate2's default: half the decoder's positions, or what the prompt leaves of them."""
    return min(cfg.max_positions // 2, cfg.max_positions - prompt_len)


@dataclasses.dataclass
class Transcript:
    text: str
    token_ids: list[int]
    """Generated text tokens of every window, without prompt and ``<|endoftext|>``."""
    audio_seconds: float
    finish_reason: str
    """``"stop"`` when every window ended on ``<|endoftext|>``, else ``"length"`` (``"error"``:
    the engine could not serve it, see ``error``)."""
    error: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Engine transcription only: ``time.perf_counter()`` stamps (see ``RequestOutput.timings``)."""


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _encode(params, cfg: ModelConfig, mel_BCA, *, dtype):
    return encode_audio(params, cfg, mel_BCA, dtype=dtype)


def encode_windows(model: Model, mel_BCA: np.ndarray, *, encoder_batch: int = 4) -> jax.Array:
    """Encoder states for log-mel windows, ``encoder_batch`` windows per encoder call."""
    chunks = [
        _encode(model.params, model.config, jnp.asarray(mel_BCA[i : i + encoder_batch]), dtype=model.dtype)
        for i in range(0, len(mel_BCA), encoder_batch)
    ]
    return jnp.concatenate(chunks) if len(chunks) > 1 else chunks[0]


def greedy_decode(
    model: Model,
    mel_BCA: np.ndarray,
    tokens: WhisperTokens,
    prompt: Sequence[int],
    *,
    max_new_tokens: int | None = None,
    encoder_batch: int = 4,
    return_logits: bool = False,
):
    """Greedy tokens per window (without ``<|endoftext|>``) and whether each stopped on it
    (:func:`encdec.generate.dense_decode` with Whisper's prompt and suppression masks)."""
    cfg = model.config
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(cfg, len(prompt))
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > cfg.max_positions:
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the decoder's "
            f"{cfg.max_positions} positions"
        )
    enc_BSD = encode_windows(model, mel_BCA, encoder_batch=encoder_batch)
    every_V, first_V = tokens.suppression_masks(cfg.decoder_vocab_size)
    decoded = dense_decode(
        model,
        enc_BSD,
        jnp.ones(enc_BSD.shape[:2], bool),
        prompt,
        max_new_tokens,
        eos_token_id=tokens.eot,
        masks=TokenMasks(every_V, first_V),
        return_logits=return_logits,
    )
    out = [toks[:-1] if stop else toks for toks, stop in zip(decoded.tokens, decoded.stopped, strict=True)]
    if return_logits:
        return out, decoded.stopped, decoded.logits
    return out, decoded.stopped


def transcribe(
    model: Model,
    audio: Sequence[str | Path | np.ndarray],
    *,
    language: str = "en",
    task: str = "transcribe",
    tokens: WhisperTokens | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    encoder_batch: int = 4,
    padding: str = "audio",
) -> list[Transcript]:
    """Transcribe WAV paths or 16 kHz arrays, ``batch_size`` 30 s windows per decode batch
    (``padding``: of a window under 30 s, see :func:`~encdec.whisper.audio.log_mel_spectrogram`)."""
    if not model.config.is_audio:
        raise ValueError(f"{model.config.model_type} is not a Whisper model")
    if len(audio) == 0:
        raise ValueError("no audio to transcribe")
    tokens = tokens or WhisperTokens.from_dir(model.path)
    prompt = tokens.prompt(language, task)
    feats = [features_for(a, model.config.num_mel_bins, padding=padding) for a in audio]
    rows = [(i, w) for i, (mel, _) in enumerate(feats) for w in range(len(mel))]
    ids: dict[tuple[int, int], list[int]] = {}
    stops: dict[tuple[int, int], bool] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        mel_BCA = np.stack([feats[i][0][w] for i, w in batch])
        out, stopped = greedy_decode(
            model, mel_BCA, tokens, prompt, max_new_tokens=max_new_tokens, encoder_batch=encoder_batch
        )
        for key, toks, stop in zip(batch, out, stopped, strict=True):
            ids[key], stops[key] = toks, bool(stop)
    results = []
    for i, (mel, seconds) in enumerate(feats):
        windows = [ids[(i, w)] for w in range(len(mel))]
        texts = [tokens.decode(model.tokenizer, t) for t in windows]
        results.append(
            Transcript(
                text=" ".join(t for t in texts if t),
                token_ids=[t for w in windows for t in w],
                audio_seconds=seconds,
                finish_reason="stop" if all(stops[(i, w)] for w in range(len(mel))) else "length",
            )
        )
    return results


def load_whisper(
    model: str | Path | None = None, dtype: str = "float32", quantize: str | None = None
) -> Model:
    """A Whisper model from an HF or CTranslate2 directory; ``None`` fetches Whisper-base (cached).
    ``quantize="int8"``: int8 weights (see :func:`encdec.load_pretrained`)."""
    import encdec
    from encdec.whisper.weights import whisper_base_dir

    path = Path(model) if model is not None else whisper_base_dir()
    loaded = encdec.load_pretrained(path, dtype=dtype, quantize=quantize)
    if not loaded.config.is_audio:
        raise ValueError(f"{path} holds a {loaded.config.model_type} model, not Whisper")
    return loaded
