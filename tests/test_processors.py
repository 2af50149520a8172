"""Each on-device logits processor equals Hugging Face's, row by row, on random scores and histories."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.generation.logits_process as hf

from encdec.processors import DecodeContext, ngram_bans, process_scores

V, T, B = 23, 14, 16
EOS = 1


class Params:
    """Per-row parameters in the engine's field names."""

    def __init__(self, rng, n_rows, **fixed):
        self.repetition_penalty = rng.choice([1.0, 1.3, 0.7, 2.5], n_rows).astype(np.float32)
        self.no_repeat_ngram = rng.choice([0, 1, 2, 3, 4], n_rows).astype(np.int32)
        self.min_new = rng.choice([0, 2, 5], n_rows).astype(np.int32)
        self.max_new = rng.integers(3, 9, n_rows).astype(np.int32)
        self.forced_bos = rng.choice([-1, 7], n_rows).astype(np.int32)
        self.forced_eos = rng.choice([-1, EOS], n_rows).astype(np.int32)
        self.suppress_X = np.full((n_rows, 4), -1, np.int32)
        self.begin_suppress_X = np.full((n_rows, 3), -1, np.int32)
        for r in range(n_rows):
            k = rng.integers(0, 5)
            self.suppress_X[r, :k] = rng.choice(V, k, replace=False)[: self.suppress_X.shape[1]]
            k = rng.integers(0, 4)
            self.begin_suppress_X[r, :k] = rng.choice(V, k, replace=False)
        for name, value in fixed.items():
            setattr(self, name, np.asarray(value))

    def arrays(self):
        return {k: jnp.asarray(v) for k, v in self.__dict__.items()}


@jax.jit
def _process(scores, ctx, arrays):
    return process_scores(scores, ctx, types.SimpleNamespace(**arrays), eos_token_id=EOS)


def _histories(rng, prefix_len=1):
    """Rows of random lengths over a small alphabet, so n-grams repeat."""
    lengths = rng.integers(prefix_len, T - 1, B).astype(np.int32)
    history = np.full((B, T), -1, np.int32)
    for r, n in enumerate(lengths):
        history[r, :n] = rng.integers(0, 6, n)
    return history, lengths


def _hf_row(scores, ids, p, r, prefix_len):
    """HF's processors, in ``_get_logits_processor``'s order, on one row."""
    ids_t = torch.tensor(ids[None, :], dtype=torch.long)
    x = torch.tensor(scores[None, :])
    procs = []
    if p.repetition_penalty[r] != 1.0:
        procs.append(hf.RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty[r])))
    if p.no_repeat_ngram[r] > 0:
        procs.append(hf.NoRepeatNGramLogitsProcessor(int(p.no_repeat_ngram[r])))
    if p.min_new[r] > 0:
        procs.append(hf.MinNewTokensLengthLogitsProcessor(prefix_len, int(p.min_new[r]), EOS))
    max_length = prefix_len + int(p.max_new[r])
    if p.forced_bos[r] >= 0:
        procs.append(hf.ForcedBOSTokenLogitsProcessor(int(p.forced_bos[r])))
    if p.forced_eos[r] >= 0:
        procs.append(hf.ForcedEOSTokenLogitsProcessor(max_length, int(p.forced_eos[r])))
    suppress = [int(t) for t in p.suppress_X[r] if t >= 0]
    if suppress:
        procs.append(hf.SuppressTokensLogitsProcessor(suppress))
    begin = [int(t) for t in p.begin_suppress_X[r] if t >= 0]
    if begin:
        procs.append(hf.SuppressTokensAtBeginLogitsProcessor(begin, prefix_len))
    for proc in procs:
        x = proc(ids_t, x)
    return x[0].numpy()


@pytest.mark.parametrize("log_probs", [False, True])
def test_process_scores_equals_hf_row_by_row(log_probs):
    rng = np.random.default_rng(0)
    prefix_len = 1  # HF's forced BOS acts at cur_len == 1: a one-token decoder prompt
    for trial in range(6):
        history, lengths = _histories(rng, prefix_len)
        if trial == 0:
            lengths[:4] = prefix_len  # first sampled step: forced BOS, begin-suppression
        scores = rng.normal(size=(B, V)).astype(np.float32) * 3
        if log_probs:  # beam search processes log-probabilities
            scores = np.asarray(jax.nn.log_softmax(scores, axis=-1))
        p = Params(rng, B)
        ctx = DecodeContext(
            history_BT=jnp.asarray(np.where(np.arange(T)[None, :] < lengths[:, None], history, -1)),
            length_B=jnp.asarray(lengths),
            prefix_len_B=jnp.full((B,), prefix_len, jnp.int32),
            num_generated_B=jnp.asarray(lengths - prefix_len),
        )
        ours = np.asarray(_process(jnp.asarray(scores), ctx, p.arrays()))
        for r in range(B):
            want = _hf_row(scores[r], history[r, : lengths[r]], p, r, prefix_len)
            np.testing.assert_allclose(ours[r], want, rtol=1e-6, atol=0, err_msg=f"trial {trial} row {r}")


def test_rows_without_processors_are_untouched():
    rng = np.random.default_rng(1)
    history, lengths = _histories(rng)
    p = Params(
        rng, B, repetition_penalty=np.ones(B, np.float32), no_repeat_ngram=np.zeros(B, np.int32),
        min_new=np.zeros(B, np.int32), forced_bos=np.full(B, -1), forced_eos=np.full(B, -1),
        suppress_X=np.full((B, 4), -1), begin_suppress_X=np.full((B, 3), -1),
    )
    scores = rng.normal(size=(B, V)).astype(np.float32)
    ctx = DecodeContext(jnp.asarray(history), jnp.asarray(lengths), jnp.ones(B, jnp.int32),
                        jnp.asarray(lengths - 1))
    out = _process(jnp.asarray(scores), ctx, p.arrays())
    np.testing.assert_array_equal(np.asarray(out), scores)


def test_ngram_bans_by_hand():
    # 5 6 7 5 6 | next: the 3-gram "5 6 7" bans 7; the 2-gram "6" -> 7 and "6" -> ... bans 7 too.
    history = jnp.asarray([[5, 6, 7, 5, 6, -1, -1], [5, 6, 7, 5, 6, -1, -1], [5, 5, 5, -1, -1, -1, -1]])
    length = jnp.asarray([5, 5, 3])
    n = jnp.asarray([3, 4, 2])
    bans = np.asarray(ngram_bans(history, length, n, 9))
    assert np.nonzero(bans[0])[0].tolist() == [7]
    assert np.nonzero(bans[1])[0].tolist() == []  # "7 5 6" never seen before
    assert np.nonzero(bans[2])[0].tolist() == [5]
