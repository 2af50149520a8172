"""Whisper's decoding rules as the engine's on-device logits hook (``WhisperFrontEnd.logits_processor``).

One hook serves every row of a decode step; what a row needs is read from its decoder history:

- **timestamps** (a prompt ending in the task token, i.e. without ``<|notimestamps|>``): the rules
  of openai-whisper's ``ApplyTimestampRules`` (HF's ``WhisperTimeStampLogitsProcessor``):
  ``<|notimestamps|>`` is banned; timestamps come in pairs (after ``text <|t|>`` comes a timestamp or
  ``<|endoftext|>``, after ``<|t|><|t|>`` text); they never decrease, and a segment's end is after
  its start; the first token is a timestamp no later than ``max_initial_timestamp``; and where the
  timestamps together are likelier than any single text token, a timestamp is chosen;
- **language detection** (a prompt of ``<|startoftranscript|>`` alone, first step): only language
  tokens are allowed, so the step's top log-probabilities are the language distribution
  (openai-whisper's ``detect_language``).

Every row bans ``<|nospeech|>`` once it samples (it is in Whisper's suppression list), but not
while its prompt is forced: the front end leaves that token out of its static mask so that the
prompt's log-probabilities after ``<|startoftranscript|>`` hold its probability, the silence test
of long-form transcription. Rows in neither mode otherwise pass unchanged. The hook is a frozen
dataclass, so two engines for the same model compare equal and share compiled steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from encdec.whisper.segments import TIME_PRECISION
from encdec.whisper.tokens import WhisperTokens

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class WhisperRules:
    """The token ids the rules need (all static: part of the compiled step)."""

    sot: int
    eot: int
    no_timestamps: int
    timestamp_begin: int | None
    task_ids: tuple[int, ...]
    language_ids: tuple[int, ...]
    max_initial_timestamp_index: int | None = 50
    """Last timestamp allowed first, in 20 ms steps (openai-whisper: 1 s); None: any."""
    no_speech: int | None = None
    """``<|nospeech|>``, banned at sampled steps only (None: nothing to ban)."""

    @classmethod
    def from_tokens(cls, tokens: WhisperTokens, max_initial_timestamp: float | None = 1.0) -> WhisperRules:
        index = None if max_initial_timestamp is None else int(round(max_initial_timestamp / TIME_PRECISION))
        return cls(
            sot=tokens.sot,
            eot=tokens.eot,
            no_timestamps=tokens.no_timestamps,
            timestamp_begin=tokens.timestamp_begin,
            task_ids=tuple(i for _, i in tokens.tasks),
            language_ids=tokens.language_ids,
            max_initial_timestamp_index=index,
            no_speech=tokens.no_speech if tokens.no_speech in tokens.suppress else None,
        )

    def __call__(self, logits_BV: jax.Array, ctx) -> jax.Array:
        """``ctx``: the engine's ``DecodeContext`` (history, lengths, prefix lengths, tokens generated)."""
        history_BT, length_B, prefix_B = ctx.history_BT, ctx.length_B, ctx.prefix_len_B
        T = history_BT.shape[1]
        vocab_V = jnp.arange(logits_BV.shape[-1], dtype=jnp.int32)
        prefix_last_B = _at(history_BT, prefix_B - 1)
        if self.no_speech is not None:
            ban_BV = (length_B >= prefix_B)[:, None] & (vocab_V == self.no_speech)[None, :]
            logits_BV = jnp.where(ban_BV, NEG_INF, logits_BV)
        if self.language_ids:
            detect_B = (prefix_B == 1) & (history_BT[:, 0] == self.sot) & (length_B == 1)
            is_lang_V = jnp.isin(vocab_V, jnp.asarray(self.language_ids, jnp.int32))
            logits_BV = jnp.where(detect_B[:, None] & ~is_lang_V[None, :], NEG_INF, logits_BV)
        if self.timestamp_begin is None:
            return logits_BV
        starts = self.task_ids or (self.sot,)
        ts_B = jnp.isin(prefix_last_B, jnp.asarray(starts, jnp.int32)) & (length_B >= prefix_B)
        return jax.lax.cond(
            jnp.any(ts_B),
            lambda x: jnp.where(ts_B[:, None], self._timestamps(x, history_BT, length_B, prefix_B, T), x),
            lambda x: x,
            logits_BV,
        )

    def _timestamps(self, logits_BV, history_BT, length_B, prefix_B, T):
        tb, V = self.timestamp_begin, logits_BV.shape[-1]
        vocab_V = jnp.arange(V, dtype=jnp.int32)
        is_ts_V = vocab_V >= tb
        logits_BV = jnp.where(vocab_V[None, :] == self.no_timestamps, NEG_INF, logits_BV)
        n_B = length_B - prefix_B  # tokens generated so far
        last_B, penult_B = _at(history_BT, length_B - 1), _at(history_BT, length_B - 2)
        last_ts_B = (n_B >= 1) & (last_B >= tb)
        penult_ts_B = (n_B < 2) | (penult_B >= tb)
        ban_BV = (last_ts_B & penult_ts_B)[:, None] & is_ts_V[None, :]  # a pair: text must follow
        ban_BV |= (last_ts_B & ~penult_ts_B)[:, None] & (vocab_V < self.eot)[None, :]  # an end: no text
        # Timestamps never decrease; a new segment may start where the last one ended.
        t_T = jnp.arange(T, dtype=jnp.int32)
        generated_BT = (t_T[None, :] >= prefix_B[:, None]) & (t_T[None, :] < length_B[:, None])
        where_B = jnp.max(jnp.where(generated_BT & (history_BT >= tb), t_T[None, :], -1), axis=1)
        latest_B = _at(history_BT, where_B)  # the last timestamp so far (-1: none)
        floor_B = jnp.where(last_ts_B & ~penult_ts_B, latest_B, latest_B + 1)
        ban_BV |= ((latest_B >= 0)[:, None] & is_ts_V[None, :]) & (vocab_V[None, :] < floor_B[:, None])
        first_B = n_B == 0
        ban_BV |= first_B[:, None] & ~is_ts_V[None, :]
        if self.max_initial_timestamp_index is not None:
            ban_BV |= first_B[:, None] & (vocab_V > tb + self.max_initial_timestamp_index)[None, :]
        logits_BV = jnp.where(ban_BV, NEG_INF, logits_BV)
        # Where all timestamps together outweigh the likeliest text token, take a timestamp.
        logprobs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
        ts_mass_B = jax.nn.logsumexp(jnp.where(is_ts_V[None, :], logprobs_BV, NEG_INF), axis=-1)
        text_best_B = jnp.max(jnp.where(is_ts_V[None, :], NEG_INF, logprobs_BV), axis=-1)
        return jnp.where((ts_mass_B > text_best_B)[:, None] & ~is_ts_V[None, :], NEG_INF, logits_BV)


def _at(history_BT: jax.Array, t_B: jax.Array) -> jax.Array:
    """Each row's token at position ``t`` (-1 where ``t`` is before the start)."""
    T = history_BT.shape[1]
    token_B = jnp.take_along_axis(history_BT, jnp.clip(t_B, 0, T - 1)[:, None], axis=1)[:, 0]
    return jnp.where(t_B >= 0, token_B, -1)
