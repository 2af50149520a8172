"""Logits processors, log-probabilities and stop strings through the engine, against HF ``generate``.

The processors themselves equal HF's row by row (``tests/test_processors.py``); here the
engine applies them inside its decode step, per request, in greedy, sampling and beam mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import encdec
from encdec.engine import Engine, EngineConfig, Request
from encdec.engine.steps import SLICED_TAKE_MAX, take_per_row
from tests.tiny_models import make_hf_model, save_word_tokenizer

MAX_NEW = 10
PROCESSOR_CASES = [
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.6, "num_beams": 3},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 1, "num_beams": 2},
    {"suppress_tokens": [30, 38, 85, 58], "begin_suppress_tokens": [41, 52]},
    {"forced_bos_token_id": 7, "forced_eos_token_id": 1, "min_new_tokens": 4},
    {"forced_bos_token_id": 9, "num_beams": 3, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5_words")
    hf = make_hf_model("t5", initializer_factor=2.0)
    hf.save_pretrained(str(d))
    save_word_tokenizer(d)
    return hf, encdec.load_pretrained(d)


def _config(**kw):
    base = dict(
        num_slots=8, page_size=4, max_encoder_len=20, max_new_tokens=MAX_NEW, encoder_buckets=(8, 16),
        steps_per_dispatch=3, max_encoder_batch=4, max_num_beams=4,
    )
    return EngineConfig(**{**base, **kw})


def _hf(hf, ids, **kw):
    cfg = hf.config
    gc = tf.GenerationConfig(
        max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id, output_scores=True, return_dict_in_generate=True,
        **kw,
    )
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        return hf.generate(torch.tensor([ids]), attention_mask=mask, generation_config=gc)


def test_processors_equal_hf_in_greedy_and_beam_mode(t5):
    hf, model = t5
    rng = np.random.default_rng(2)
    inputs = [rng.integers(3, 90, int(rng.integers(3, 20))).tolist() for _ in PROCESSOR_CASES]
    cases = zip(inputs, PROCESSOR_CASES, strict=True)
    requests = [Request(ids, max_new_tokens=MAX_NEW, **case) for ids, case in cases]
    outs = Engine(model, _config()).generate(requests)
    plain = Engine(model, _config()).generate([Request(ids, max_new_tokens=MAX_NEW) for ids in inputs])
    changed = 0
    for ids, case, out, base in zip(inputs, PROCESSOR_CASES, outs, plain, strict=True):
        hf_case = {k: v for k, v in case.items()}
        hf_out = _hf(hf, ids, **hf_case)
        theirs = hf_out.sequences[0, 1:].tolist()
        n = len(out.token_ids)
        assert out.token_ids == theirs[:n] and set(theirs[n:]) <= {0, 1}, (case, out.token_ids, theirs)
        changed += out.token_ids != base.token_ids
    assert changed >= len(PROCESSOR_CASES) - 1  # the processors really change these outputs


def test_logprobs_equal_hf_scores(t5):
    hf, model = t5
    ids = [5, 17, 33, 40, 9, 61]
    out = Engine(model, _config()).generate(
        [Request(ids, max_new_tokens=MAX_NEW, logprobs=3, repetition_penalty=1.4)]
    )[0]
    hf_out = _hf(hf, ids, repetition_penalty=1.4)
    hf_lp = torch.log_softmax(torch.stack(hf_out.scores)[:, 0], dim=-1).numpy()  # [steps, V]
    tokens = out.token_ids
    np.testing.assert_allclose(out.logprobs, hf_lp[np.arange(len(tokens)), tokens], atol=1e-4)
    for step, top in enumerate(out.top_logprobs):
        want = np.argsort(-hf_lp[step])[:3]
        assert list(top)[:3] == want.tolist()
        np.testing.assert_allclose([top[t] for t in want], hf_lp[step, want], atol=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(out.logprobs))
    assert Engine(model, _config()).generate([Request(ids, max_new_tokens=3)])[0].logprobs is None


def test_prompt_logprobs_are_the_forced_prefix_scores(t5):
    hf, model = t5
    ids, prefix = [5, 17, 33], [0, 44, 12, 70]
    out = Engine(model, _config(max_decoder_prefix=4)).generate(
        [Request(ids, max_new_tokens=3, decoder_prefix=prefix, prompt_logprobs=2)]
    )[0]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([prefix])).logits[0]
    lp = torch.log_softmax(logits, dim=-1).numpy()
    assert len(out.prompt_logprobs) == len(prefix) - 1
    for i, entry in enumerate(out.prompt_logprobs):
        forced = prefix[i + 1]
        assert entry[forced] == pytest.approx(lp[i, forced], abs=2e-5)
        best = np.argsort(-lp[i])[:2]
        assert all(entry[t] == pytest.approx(lp[i, t], abs=2e-5) for t in best)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_watched_token_is_in_every_prompt_entry(t5, num_beams):
    """``prompt_logprob_token_id``: that token's log-probability at every reported prompt
    position, however unlikely (Whisper's ``no_speech_prob``), beside the forced tokens'."""
    hf, model = t5
    ids, prefix = [5, 17, 33], [0, 44, 12, 70]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([prefix])).logits[0]
    lp = torch.log_softmax(logits, dim=-1).numpy()
    watched = int(np.argmin(lp[1]))  # the least likely after the second prefix token
    kw = dict(max_new_tokens=3, decoder_prefix=prefix, num_beams=num_beams)
    watching = dict(prompt_logprobs=0, prompt_logprobs_from=1, prompt_logprob_token_id=watched)
    out = Engine(model, _config(max_decoder_prefix=4)).generate([Request(ids, **kw, **watching)])[0]
    assert len(out.prompt_logprobs) == len(prefix) - 1
    assert out.prompt_logprobs[0] == {}  # prefilled
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.keys() == {prefix[i + 1], watched}
        assert entry[prefix[i + 1]] == pytest.approx(lp[i, prefix[i + 1]], abs=2e-5)
        assert entry[watched] == pytest.approx(lp[i, watched], abs=2e-5)
    assert out.prompt_logprobs[1][watched] < np.log(1e-3)
    plain = Engine(model, _config(max_decoder_prefix=4)).generate([Request(ids, **kw)])[0]
    assert out.token_ids == plain.token_ids


def test_prompt_logprobs_from_a_position_prefill_the_positions_before_it(t5):
    _, model = t5
    ids, prefix = [5, 17, 33], [0, 44, 12, 70, 9, 61]
    kw = dict(max_new_tokens=3, decoder_prefix=prefix, prompt_logprobs=2)
    full_engine, part_engine = (Engine(model, _config(max_decoder_prefix=6)) for _ in range(2))
    full = full_engine.generate([Request(ids, **kw)])[0]
    part = part_engine.generate([Request(ids, **kw, prompt_logprobs_from=3)])[0]
    assert part.token_ids == full.token_ids
    assert len(part.prompt_logprobs) == len(full.prompt_logprobs) == len(prefix) - 1
    assert part.prompt_logprobs[:3] == [{}, {}, {}]
    for mine, theirs in zip(part.prompt_logprobs[3:], full.prompt_logprobs[3:], strict=True):
        assert mine.keys() == theirs.keys()
        assert all(mine[t] == pytest.approx(theirs[t], abs=2e-5) for t in mine)
    assert part_engine.stats().decode_steps < full_engine.stats().decode_steps


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_prefilled_prefix_equals_hf_and_the_step_by_step_prefix(t5, num_beams):
    """A forced decoder prefix is stored by the encode step in one decoder pass (no decode step
    per prefix token): the output equals HF ``generate`` from those ``decoder_input_ids`` and the
    engine's own step-by-step path (taken when prompt log-probabilities are asked for)."""
    hf, model = t5
    ids, prefix = [5, 17, 33, 8], [0, 44, 12, 70, 9, 61, 23]
    kw = dict(max_new_tokens=MAX_NEW, decoder_prefix=prefix, num_beams=num_beams)
    fast = Engine(model, _config(max_decoder_prefix=8))
    slow = Engine(model, _config(max_decoder_prefix=8))
    crowd = [Request([7, 8, 9 + i], max_new_tokens=5 + i) for i in range(3)]  # slots beside it
    got = fast.generate([*crowd, Request(ids, **kw)])
    stepped = slow.generate([*crowd, Request(ids, **kw, prompt_logprobs=0)])
    assert [o.token_ids for o in got] == [o.token_ids for o in stepped]
    cfg = hf.config
    gc = tf.GenerationConfig(
        max_new_tokens=MAX_NEW, do_sample=False, num_beams=num_beams, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
    )
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), decoder_input_ids=torch.tensor([prefix]), generation_config=gc)
    theirs, n = ref[0, len(prefix) :].tolist(), len(got[-1].token_ids)
    assert got[-1].token_ids == theirs[:n] and set(theirs[n:]) <= {0, 1}
    # The prefix cost decode steps only where it was fed step by step.
    assert fast.stats().decode_steps < slow.stats().decode_steps


def test_seeded_sampling_with_processors_is_batch_invariant(t5):
    _, model = t5
    target = Request([5, 9, 17], max_new_tokens=MAX_NEW, temperature=1.2, seed=4, repetition_penalty=1.5,
                     no_repeat_ngram_size=2, suppress_tokens=[11, 12])
    alone = Engine(model, _config(num_slots=1)).generate([target])[0]
    crowd = [Request([7, 8, 9 + i], max_new_tokens=MAX_NEW, temperature=0.9, seed=i) for i in range(5)]
    mixed = Engine(model, _config()).generate([*crowd[:2], target, *crowd[2:]])
    assert mixed[2].token_ids == alone.token_ids
    tokens = alone.token_ids
    assert not {11, 12} & set(tokens)
    pairs = list(zip([0, *tokens], tokens, strict=False))
    assert len(pairs) == len(set(pairs))  # no bigram twice, the start token included


def test_stop_strings_end_the_request_and_free_its_slot(t5):
    _, model = t5
    engine = Engine(model, _config(num_slots=2))
    text = "w5 w17 w33 w40"
    full = engine.generate([Request(text, max_new_tokens=MAX_NEW)])[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    first = full.text.index(stop)
    out = engine.generate([Request(text, max_new_tokens=MAX_NEW, stop=[stop, "never-there"])])[0]
    assert out.finish_reason == "stop" and out.text == full.text[:first]
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) <= 3
    stats = engine.stats()
    assert (stats.self_pages_used, stats.tracked_requests) == (0, 0)
    with pytest.raises(encdec.engine.RequestError, match="stop strings need text"):
        engine.submit(Request([5, 6], stop=["x"]))


@pytest.mark.parametrize("rows", [8, 40])  # one-element slices on CPU; a gather past SLICED_TAKE_MAX
def test_take_per_row_equals_take_along_axis(rows):
    rng = np.random.default_rng(rows)
    V = 300
    x_BV = jnp.asarray(rng.standard_normal((rows, V)).astype(np.float32))
    ids_BN = jnp.asarray(rng.integers(-V, V, (rows, 2)).astype(np.int32))  # negatives count from the end
    got = jax.jit(take_per_row)(x_BV, ids_BN)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.take_along_axis(x_BV, ids_BN, axis=1)))
    sliced = jax.default_backend() == "cpu" and rows * 2 <= SLICED_TAKE_MAX
    # XLA:CPU splits a gather over its threads: the sliced form must not be one
    assert ("gather" in jax.jit(take_per_row).lower(x_BV, ids_BN).as_text()) != sliced
