"""How :mod:`encdec.whisper.longform` transcribes: openai-whisper's options, and the chunking."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from encdec.whisper.segments import Thresholds
from encdec.whisper.silence import SilenceOptions


@dataclasses.dataclass(frozen=True)
class LongFormOptions:
    """How files are transcribed (defaults: openai-whisper's, greedy)."""

    language: str | None = None
    """Spoken language code; None: detected per file from its first 30 s of speech."""
    task: str = "transcribe"
    """``transcribe``, or ``translate`` into English."""
    beam_size: int = 1
    """Beams at temperature 0 (1: greedy)."""
    best_of: int = 5
    """Samples drawn at a fallback temperature; the likeliest is kept."""
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    """Tried in turn while a window's decode fails the thresholds."""
    thresholds: Thresholds = Thresholds()
    condition_on_previous_text: bool = True
    """Prompt each window with its stream's text so far (reset after a decode above
    ``prompt_reset_on_temperature``)."""
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | Sequence[int] | None = None
    """Text (or its token ids) given as the text before each stream's first window
    (faster-whisper's ``initial_prompt``: spellings, names, a style to follow), encoded as its
    sequential ``transcribe`` encodes it (:meth:`~encdec.whisper.tokens.WhisperTokens.encode_prompt`).
    It stays in the prompt as the stream's previous text does: every window until a reset (above,
    or after the first window without ``condition_on_previous_text``), its first tokens dropped as
    the text grows past ``max_prompt_tokens``. Each chunk of a file (``vad``) starts with it, as
    each of faster-whisper's batched chunks does (its sequential walk with VAD prompts once)."""
    max_prompt_tokens: int | None = None
    """Most previous-text tokens in a prompt; None: as many as leave every window the model's
    whole token budget (half the decoder's positions): 221 for Whisper. (openai-whisper keeps
    223, which cuts a window under a full prompt to 221 tokens.)"""
    timestamps: bool = True
    """Decode timestamps (segments, seeking); False: one segment per window, fixed 30 s steps."""
    vad: bool = True
    """Cut files at silences into chunks decoded in parallel (and skip the silences); False:
    one stream per file over all its audio."""
    silence: SilenceOptions = SilenceOptions()
    seed: int = 0
    """Seed of the fallback samples (each window's draw depends on it and the window only)."""
    adapter: str | None = None
    """Id of a LoRA adapter in the engine's bank that every window (and language detection) uses."""

    def __post_init__(self):
        if self.beam_size < 1 or self.best_of < 1:
            raise ValueError(f"beam_size and best_of must be >= 1, got {self.beam_size}, {self.best_of}")
        if not self.temperatures or any(not 0 <= t < math.inf for t in self.temperatures):
            raise ValueError(f"temperatures must be finite and non-negative, got {self.temperatures}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        prompt = self.initial_prompt
        if prompt is not None and not isinstance(prompt, str):
            ids = tuple(prompt) if isinstance(prompt, list | tuple | range | np.ndarray) else (None,)
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"initial_prompt must be text or token ids (ints >= 0), got {prompt!r:.80}")
            object.__setattr__(self, "initial_prompt", tuple(int(t) for t in ids))
        if prompt is not None and self.max_prompt_tokens == 0:
            raise ValueError("initial_prompt needs max_prompt_tokens > 0 (0 keeps no prompt at all)")

    def prompt_tokens(self, max_positions: int) -> int:
        """Most previous-text tokens in a window's prompt, for a decoder of ``max_positions``."""
        if not self.condition_on_previous_text and self.initial_prompt is None:
            return 0
        # <|startofprev|>, the text, the prompt; then max_positions // 2 tokens to generate.
        most = max(0, max_positions - max_positions // 2 - self._base_len)
        return most if self.max_prompt_tokens is None else min(self.max_prompt_tokens, most)

    def prefix_len(self, max_positions: int) -> int:
        """Longest decoder prompt a window may get (sizes the engine's ``max_decoder_prefix``)."""
        previous = self.prompt_tokens(max_positions)
        return (1 + previous if previous else 0) + self._base_len

    @property
    def _base_len(self) -> int:
        """``<|startoftranscript|><|lang|><|task|>`` and ``<|notimestamps|>`` without timestamps."""
        return 3 + (0 if self.timestamps else 1)
