"""Language detection: one decode step after ``<|startoftranscript|>``, language tokens only.

openai-whisper's ``detect_language``: the decoder reads ``<|startoftranscript|>`` and the
language tokens' probabilities at the next position are the answer. Here that is an ordinary
engine request with the one-token prefix ``[<|startoftranscript|>]`` and one token to generate;
Whisper's logits hook (:mod:`encdec.whisper.rules`) allows only language tokens at that step, so
the generated token is the likeliest language and the step's top log-probabilities are the
distribution over languages (normalized over languages alone, as openai-whisper does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encdec.engine import Engine, Request, RequestOutput
from encdec.whisper.audio import N_SAMPLES, load_audio
from encdec.whisper.frontend import AudioInput, WhisperFrontEnd
from encdec.whisper.tokens import WhisperTokens


def language_name(code: str) -> str:
    """Whisper's English name for a language code (``"en"`` -> ``"english"``), as OpenAI's API
    reports a transcription's language; a code Whisper does not know is returned as it is."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code)


def detection_request(tokens: WhisperTokens, samples: np.ndarray, top: int = 5) -> Request:
    """The request for ``samples``' language (at most the first 30 s are used), ``top`` languages back."""
    if not tokens.languages:
        raise ValueError("this model is English-only: it has no language tokens to detect")
    return Request(
        AudioInput(np.asarray(samples[:N_SAMPLES])),
        decoder_prefix=[tokens.sot],
        max_new_tokens=1,
        logprobs=top,
    )


def language_probs(tokens: WhisperTokens, out: RequestOutput) -> dict[str, float]:
    """Languages and their probabilities from a detection request's output, likeliest first."""
    top = out.top_logprobs[0] if out.top_logprobs else {out.token_ids[0]: out.logprobs[0]}
    probs = {tokens.language_of(t): math.exp(lp) for t, lp in top.items()}
    return dict(sorted(((k, v) for k, v in probs.items() if k is not None), key=lambda kv: -kv[1]))


def detect_languages(
    engine: Engine, audio: Sequence[str | Path | np.ndarray], *, top: int | None = None
) -> list[dict[str, float]]:
    """Each file's (or 16 kHz array's) ``top`` languages with their probabilities, from its first
    30 s, all decoded together. ``top``: at most ``EngineConfig.max_logprobs`` (its default)."""
    if not isinstance(engine.frontend, WhisperFrontEnd):
        raise ValueError("the engine has no Whisper front end (build it with whisper_engine)")
    tokens = engine.frontend.tokens
    top = engine.config.max_logprobs if top is None else top
    requests = [detection_request(tokens, load_audio(a), top) for a in audio]
    outputs = engine.generate(requests)
    for out in outputs:
        if out.finish_reason == "error":
            raise ValueError(f"language detection failed: {out.error}")
    return [language_probs(tokens, out) for out in outputs]
