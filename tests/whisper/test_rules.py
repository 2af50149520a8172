"""Whisper's decoding rules as a logits hook, against HF's ``WhisperTimeStampLogitsProcessor``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from encdec.processors import DecodeContext
from encdec.whisper.rules import WhisperRules
from encdec.whisper.tokens import WhisperTokens
from tests.whisper.tiny_whisper import (
    DE,
    EN,
    EOT,
    NO_TIMESTAMPS,
    SOT,
    SUPPRESS,
    SUPPRESS_BEGIN,
    TRANSCRIBE,
    VOCAB,
    VOCABULARY,
)

TOKENS = WhisperTokens.from_vocabulary(VOCABULARY, suppress=SUPPRESS, suppress_begin=SUPPRESS_BEGIN)
TB = TOKENS.timestamp_begin
NO_SPEECH = 88  # <|nocaptions|>
T = 24


def _context(rows):
    history = np.full((len(rows), T), -1, np.int32)
    for b, (prefix, generated) in enumerate(rows):
        seq = [*prefix, *generated]
        history[b, : len(seq)] = seq
    length = np.array([len(p) + len(g) for p, g in rows], np.int32)
    prefix = np.array([len(p) for p, _ in rows], np.int32)
    return DecodeContext(
        jnp.asarray(history), jnp.asarray(length), jnp.asarray(prefix), jnp.asarray(length - prefix)
    )


def _hf(rows, logits, max_initial):
    config = tf.GenerationConfig(no_timestamps_token_id=NO_TIMESTAMPS, eos_token_id=EOT)
    config.max_initial_timestamp_index = max_initial
    out = []
    for (prefix, generated), row in zip(rows, logits, strict=True):
        proc = tf.WhisperTimeStampLogitsProcessor(config, begin_index=len(prefix))
        ids = torch.tensor([[*prefix, *generated]])
        out.append(proc(ids, torch.tensor(row[None])).numpy()[0])
    return np.stack(out)


def _random_rows(rng, n):
    prompt = [SOT, EN, TRANSCRIBE]
    rows = [(prompt, [])]
    for _ in range(n - 1):
        steps = int(rng.integers(1, 10))
        # Mostly valid-looking sequences (text and rising timestamps), some arbitrary.
        ts = sorted(rng.integers(TB, VOCAB, steps))
        gen = [int(ts[i]) if rng.random() < 0.4 else int(rng.integers(0, EOT)) for i in range(steps)]
        rows.append((prompt, gen))
    return rows


@pytest.mark.parametrize("max_initial", [None, 2])
def test_timestamp_rules_equal_hf(max_initial):
    rng = np.random.default_rng(0)
    rows = _random_rows(rng, 40)
    # Each row's logits, some with the timestamps' mass above every text token, some below.
    logits = rng.normal(0.0, 2.0, (len(rows), VOCAB)).astype(np.float32)
    logits[::3, TB:] += 3.0
    rules = dataclasses.replace(
        WhisperRules.from_tokens(TOKENS), max_initial_timestamp_index=max_initial, no_speech=None
    )
    got = np.asarray(jax.jit(rules)(jnp.asarray(logits), _context(rows)))
    want = _hf(rows, logits, max_initial)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got[~np.isneginf(got)], want[~np.isneginf(want)], rtol=1e-6)
    # The rules did something: the forced-timestamp test fired in some rows, not in others.
    text_banned = np.isneginf(got[:, :EOT]).all(axis=1)
    assert 0 < text_banned.sum() < len(rows)


def test_language_step_allows_only_languages_and_other_rows_pass_unchanged():
    rng = np.random.default_rng(1)
    rows = [
        ([SOT], []),  # detection
        ([SOT, EN, TRANSCRIBE, NO_TIMESTAMPS], [3, 4]),  # no timestamps: untouched
        ([SOT, DE, TRANSCRIBE, NO_TIMESTAMPS], []),
        ([SOT, EN, TRANSCRIBE], []),  # timestamps: the first token is a timestamp
    ]
    logits = rng.normal(size=(len(rows), VOCAB)).astype(np.float32)
    rules = WhisperRules.from_tokens(TOKENS)
    assert rules.no_speech == NO_SPEECH  # suppressed: banned by the hook once a row samples
    got = np.array(rules(jnp.asarray(logits), _context(rows)))
    assert np.isneginf(got[:, NO_SPEECH]).all()
    got[1:3, NO_SPEECH] = logits[1:3, NO_SPEECH]
    assert set(np.flatnonzero(np.isfinite(got[0]))) == {EN, DE}
    np.testing.assert_array_equal(got[1:3], logits[1:3])
    assert set(np.flatnonzero(np.isfinite(got[3]))) == set(range(TB, TB + 51)) & set(range(VOCAB))


def test_forced_prefix_positions_are_untouched():
    """Prompt log-probabilities (the ``<|nospeech|>`` probability after ``<|startoftranscript|>``)
    are read at forced positions: the rules, ``<|nospeech|>``'s ban included, leave them alone."""
    logits = np.random.default_rng(2).normal(size=(1, VOCAB)).astype(np.float32)
    ctx = _context([([SOT, EN, TRANSCRIBE], [])])
    ctx = ctx.replace(length_B=jnp.asarray([1]), num_generated_B=jnp.asarray([0]))  # inside the prefix
    got = WhisperRules.from_tokens(TOKENS)(jnp.asarray(logits), ctx)
    np.testing.assert_array_equal(np.asarray(got), logits)
