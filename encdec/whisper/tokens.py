"""Whisper's special tokens and suppression lists, read from an HF or a CTranslate2 directory.

- CTranslate2 / faster-whisper: ``vocabulary.txt`` (or ``.json``) names every id; ``config.json`` holds
  ``suppress_ids``, ``suppress_ids_begin`` and ``lang_ids``.
- Hugging Face: ``generation_config.json`` holds ``suppress_tokens``, ``begin_suppress_tokens``,
  ``lang_to_id``, ``task_to_id``, ``no_timestamps_token_id`` and ``decoder_start_token_id``; the
  timestamp tokens follow ``<|notimestamps|>`` and ``<|nospeech|>`` precedes it (HF's convention).

Long-form transcription also needs the timestamp tokens ``<|0.00|>`` .. ``<|30.00|>`` (one per 20 ms,
from :attr:`WhisperTokens.timestamp_begin` to the end of the vocabulary), ``<|startofprev|>``
(previous text as a prompt) and ``<|nospeech|>`` (``<|nocaptions|>`` in older vocabularies).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from encdec.checkpoints.ctranslate2 import has_vocabulary, read_config, read_vocabulary
from encdec.checkpoints.hf import CheckpointError, read_json
from encdec.engine.validation import unicode_text

_LANGUAGE = re.compile(r"^<\|([a-z]{2,3}|haw|yue)\|>$")


@dataclasses.dataclass(frozen=True)
class WhisperTokens:
    sot: int
    """``<|startoftranscript|>``"""
    eot: int
    """``<|endoftext|>``: end of the transcript."""
    no_timestamps: int
    tasks: tuple[tuple[str, int], ...]
    """``transcribe`` and ``translate`` ids (empty for English-only models without task tokens)."""
    languages: tuple[tuple[str, int], ...]
    """Language code -> id (``en`` -> ``<|en|>``); empty for English-only models."""
    suppress: tuple[int, ...]
    """Ids banned at every step."""
    suppress_begin: tuple[int, ...]
    """Ids also banned at the first generated step (blank, ``<|endoftext|>``)."""
    timestamp_begin: int | None = None
    """``<|0.00|>``; every id from it up is a timestamp (None: the model has none)."""
    sot_prev: int | None = None
    """``<|startofprev|>``: previous text follows it, before ``<|startoftranscript|>``."""
    no_speech: int | None = None
    """``<|nospeech|>``: its probability right after ``<|startoftranscript|>`` says a window is silent."""

    @property
    def language_ids(self) -> tuple[int, ...]:
        return tuple(i for _, i in self.languages)

    def language_of(self, token: int) -> str | None:
        """The language code of a language token id (None for any other id)."""
        return next((code for code, i in self.languages if i == token), None)

    def check_language(self, language: str) -> None:
        """``ValueError`` naming the model's languages unless ``language`` is one of them."""
        langs = dict(self.languages)
        if langs and language not in langs:
            raise ValueError(f"language {language!r} is not one of the model's: {', '.join(sorted(langs))}")
        if not langs and language != "en":
            raise ValueError(f"this model is English-only: language {language!r} is not available")

    def prompt(
        self,
        language: str = "en",
        task: str = "transcribe",
        *,
        timestamps: bool = False,
        previous: Sequence[int] = (),
    ) -> list[int]:
        """``<|startoftranscript|><|lang|><|task|><|notimestamps|>`` (lang/task where the model has them).

        ``timestamps``: leave out ``<|notimestamps|>``, so the model writes timestamp tokens.
        ``previous``: text tokens of the preceding audio, given as ``<|startofprev|>`` + tokens
        before the rest (openai-whisper's ``condition_on_previous_text``).
        """
        prompt = [self.sot]
        if self.languages:
            self.check_language(language)
            prompt.append(dict(self.languages)[language])
        if self.tasks:
            tasks = dict(self.tasks)
            if task not in tasks:
                raise ValueError(f"task {task!r} is not one of {', '.join(sorted(tasks))}")
            prompt.append(tasks[task])
        if timestamps and self.timestamp_begin is None:
            raise ValueError("this model has no timestamp tokens")
        if previous:
            if self.sot_prev is None:
                raise ValueError("this model has no <|startofprev|> token for a previous-text prompt")
            prompt = [self.sot_prev, *previous, *prompt]
        return prompt if timestamps else prompt + [self.no_timestamps]

    def suppression_masks(self, vocab_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Boolean ``[V]`` masks: banned at every step, and banned at the first step."""
        every = np.zeros(vocab_size, bool)
        every[[t for t in self.suppress if 0 <= t < vocab_size]] = True
        first = every.copy()
        first[[t for t in self.suppress_begin if 0 <= t < vocab_size]] = True
        return jnp.asarray(every), jnp.asarray(first)

    def decode(self, tokenizer: Any, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special and timestamp tokens dropped); without a tokenizer, the
        text tokens' ids joined by spaces."""
        text = [t for t in ids if t < self.eot]
        if tokenizer is None:
            return " ".join(map(str, text))
        return tokenizer.decode(text, skip_special_tokens=True).strip()

    def encode_prompt(self, tokenizer: Any, prompt: str | Sequence[int], vocab_size: int) -> tuple[int, ...]:
        """Token ids of a prompt (previous text, after ``<|startofprev|>``): text encoded as
        faster-whisper's sequential ``transcribe`` encodes its ``initial_prompt``,
        ``" " + text.strip()`` (text of only spaces: no prompt), and refused where it spells a
        special token (``<|endoftext|>``: HF's ``get_prompt_ids`` and openai-whisper refuse it
        too); ids are taken as they are, checked against the vocabulary. A ``ValueError`` names
        what cannot be used."""
        if isinstance(prompt, str):
            if not prompt.strip():
                return ()
            if tokenizer is None:
                raise ValueError("a text prompt needs the model's tokenizer; this model has none (give ids)")
            unicode_text("the prompt", prompt)
            encoded = tokenizer(" " + prompt.strip(), add_special_tokens=False)["input_ids"]
            ids = tuple(int(t) for t in encoded)
            special = [t for t in ids if t >= self.eot]
            if special:
                named = tokenizer.convert_ids_to_tokens(special[:3])
                raise ValueError(f"the prompt's text spells special tokens {named}: give plain text (or ids)")
        else:
            ids = tuple(int(t) for t in prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"the prompt has ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if self.sot_prev is None and ids:
            raise ValueError("this model has no <|startofprev|> token for a previous-text prompt")
        return ids

    @classmethod
    def from_vocabulary(
        cls,
        vocabulary: Sequence[str],
        *,
        suppress: Sequence[int],
        suppress_begin: Sequence[int],
        lang_ids: Sequence[int] | None = None,
    ) -> WhisperTokens:
        ids = {tok: i for i, tok in enumerate(vocabulary)}
        try:
            sot, eot, no_ts = ids["<|startoftranscript|>"], ids["<|endoftext|>"], ids["<|notimestamps|>"]
        except KeyError as e:
            raise CheckpointError(f"the vocabulary lacks Whisper's special token {e.args[0]}") from e
        tasks = tuple((t, ids[f"<|{t}|>"]) for t in ("transcribe", "translate") if f"<|{t}|>" in ids)
        if lang_ids is None:
            lang_ids = [i for tok, i in ids.items() if _LANGUAGE.match(tok)]
        languages = tuple((vocabulary[i][2:-2], int(i)) for i in lang_ids)
        no_speech = ids.get("<|nospeech|>", ids.get("<|nocaptions|>"))
        return cls(
            sot,
            eot,
            no_ts,
            tasks,
            languages,
            tuple(map(int, suppress)),
            tuple(map(int, suppress_begin)),
            timestamp_begin=ids.get("<|0.00|>"),
            sot_prev=ids.get("<|startofprev|>"),
            no_speech=no_speech,
        )

    @classmethod
    def from_dir(cls, path: str | Path | None) -> WhisperTokens:
        """Read from a CTranslate2 (vocabulary) or Hugging Face (``generation_config.json``) directory."""
        if path is None:
            raise ValueError("the model has no directory to read Whisper's special tokens from; pass tokens=")
        path = Path(path)
        if has_vocabulary(path):
            config = read_config(path / "config.json")
            return cls.from_vocabulary(
                read_vocabulary(path),
                suppress=config.get("suppress_ids") or [],
                suppress_begin=config.get("suppress_ids_begin") or [],
                lang_ids=config.get("lang_ids"),
            )
        gen_file = path / "generation_config.json"
        if not gen_file.exists():
            raise CheckpointError(
                f"{path} has neither a CTranslate2 vocabulary nor generation_config.json for Whisper's tokens"
            )
        gen = read_json(gen_file, "generation config")
        cfg = read_json(path / "config.json", "model config")
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        try:
            no_ts = int(gen["no_timestamps_token_id"])
            prev = gen.get("prev_sot_token_id")
            return cls(
                sot=int(gen.get("decoder_start_token_id", cfg.get("decoder_start_token_id"))),
                eot=int(eos[0] if isinstance(eos, list) else eos),
                no_timestamps=no_ts,
                tasks=tuple((k, int(v)) for k, v in (gen.get("task_to_id") or {}).items()),
                languages=tuple((k[2:-2], int(v)) for k, v in (gen.get("lang_to_id") or {}).items()),
                suppress=tuple(gen.get("suppress_tokens") or cfg.get("suppress_tokens") or ()),
                suppress_begin=tuple(
                    gen.get("begin_suppress_tokens") or cfg.get("begin_suppress_tokens") or ()
                ),
                timestamp_begin=no_ts + 1,
                sot_prev=None if prev is None else int(prev),
                no_speech=no_ts - 1,
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{gen_file} lacks Whisper's token ids: {e}") from e
