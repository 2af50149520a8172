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
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from encdec.checkpoints.pretrained import Model
from encdec.config import ModelConfig
from encdec.models import decode
from encdec.models.whisper import encode_audio, init_head_major_kv
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


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "max_len"))
def _init_kv(params, cfg: ModelConfig, enc_BSD, *, dtype, max_len):
    mask_BS = jnp.ones(enc_BSD.shape[:2], bool)
    return init_head_major_kv(params, cfg, enc_BSD, mask_BS, max_len, dtype=dtype)


def _pick(logits_BV, banned_V):
    return jnp.argmax(jnp.where(banned_V[None, :], -jnp.inf, logits_BV), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("kv",))
def _prompt_step(params, cfg: ModelConfig, prompt_BT, kv, banned_first_V, *, dtype):
    positions_BT = jnp.broadcast_to(jnp.arange(prompt_BT.shape[1], dtype=jnp.int32), prompt_BT.shape)
    logits_BTV, kv = decode(params, cfg, prompt_BT, positions_BT, kv, dtype=dtype)
    return _pick(logits_BTV[:, -1], banned_first_V), logits_BTV[:, -1], kv


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("kv",))
def _step(params, cfg: ModelConfig, tokens_B, kv, banned_V, *, dtype):
    positions_B1 = jnp.broadcast_to(kv.index, tokens_B.shape)[:, None]
    logits_B1V, kv = decode(params, cfg, tokens_B[:, None], positions_B1, kv, dtype=dtype)
    return _pick(logits_B1V[:, 0], banned_V), logits_B1V[:, 0], kv


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
    """Greedy tokens per window (without ``<|endoftext|>``) and whether each stopped on it."""
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
    B = len(mel_BCA)
    enc_BSD = encode_windows(model, mel_BCA, encoder_batch=encoder_batch)
    kv = _init_kv(model.params, cfg, enc_BSD, dtype=model.dtype, max_len=len(prompt) + max_new_tokens)
    banned_V, banned_first_V = tokens.suppression_masks(cfg.decoder_vocab_size)
    prompt_BT = jnp.asarray(np.tile(np.asarray(prompt, np.int32), (B, 1)))
    next_B, logits_BV, kv = _prompt_step(model.params, cfg, prompt_BT, kv, banned_first_V, dtype=model.dtype)
    out: list[list[int]] = [[] for _ in range(B)]
    stopped = np.zeros(B, bool)
    all_logits = []
    for step in range(max_new_tokens):
        if return_logits:
            all_logits.append(np.asarray(logits_BV))
        for i, t in enumerate(np.asarray(next_B).tolist()):
            if not stopped[i]:
                stopped[i] = t == tokens.eot
                if not stopped[i]:
                    out[i].append(t)
        if stopped.all() or step == max_new_tokens - 1:
            break
        next_B, logits_BV, kv = _step(model.params, cfg, next_B, kv, banned_V, dtype=model.dtype)
    if return_logits:
        return out, stopped, np.stack(all_logits, axis=1)
    return out, stopped


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
) -> list[Transcript]:
    """Transcribe WAV paths or 16 kHz arrays, ``batch_size`` 30 s windows per decode batch."""
    if not model.config.is_audio:
        raise ValueError(f"{model.config.model_type} is not a Whisper model")
    if len(audio) == 0:
        raise ValueError("no audio to transcribe")
    tokens = tokens or WhisperTokens.from_dir(model.path)
    prompt = tokens.prompt(language, task)
    feats = [features_for(a, model.config.num_mel_bins) for a in audio]
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


def load_whisper(model: str | Path | None = None, dtype: str = "float32") -> Model:
    """A Whisper model from an HF or CTranslate2 directory; ``None`` fetches Whisper-base (cached)."""
    import encdec
    from encdec.whisper.weights import whisper_base_dir

    path = Path(model) if model is not None else whisper_base_dir()
    loaded = encdec.load_pretrained(path, dtype=dtype)
    if not loaded.config.is_audio:
        raise ValueError(f"{path} holds a {loaded.config.model_type} model, not Whisper")
    return loaded


def transcribe_cli(files: list[str], model: str | None, language: str) -> int:
    """``encdec transcribe FILE.wav ...``: all files through the engine, one ``file<TAB>text`` line
    each; per-file timings and errors on stderr (exit status 2 if any file failed)."""
    from encdec.whisper.serving import transcribe_with_engine, whisper_engine

    loaded = load_whisper(model)
    start = time.perf_counter()
    engine = whisper_engine(loaded, num_slots=min(16, len(files)))
    results = transcribe_with_engine(engine, files, language=language)
    elapsed = time.perf_counter() - start
    failed = 0
    for file, result in zip(files, results, strict=True):
        if result.error is not None:
            failed += 1
            print(f"encdec transcribe: error: {file}: {result.error}", file=sys.stderr)
            continue
        print(f"{file}\t{result.text}")
        t = result.timings
        first, done = t["first_token"] - t["arrival"], t["done"] - t["arrival"]
        print(
            f"{file}: {result.audio_seconds:.1f} s of audio, first token after {first:.2f} s, "
            f"done after {done:.2f} s",
            file=sys.stderr,
        )
    seconds = sum(r.audio_seconds for r in results)
    print(
        f"{len(files) - failed} file(s), {seconds:.1f} s of audio in {elapsed:.1f} s "
        f"(engine compile included)",
        file=sys.stderr,
    )
    return 2 if failed else 0
