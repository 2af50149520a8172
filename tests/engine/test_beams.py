"""Beam search through the engine against Hugging Face ``generate``, every family, one batch.

Each family's requests (k = 2, 4, 5 beams; with and without a length penalty; early stopping
False, True and "never"; n-best lists) run together in one engine, mixed with greedy and
sampled requests, and each must give what HF's ``generate`` gives it alone: the same best
sequence token for token, the same n-best in order, sequence scores within 1e-4 (relative to
the score's size: the models' logits differ from torch's at float32 rounding).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from transformers.generation.utils import GenerationMixin

import encdec
from encdec.beam import _places
from encdec.cache.window_kv import SlotWindow
from encdec.engine import Engine, EngineConfig, Request, RequestError
from encdec.whisper import AudioInput, whisper_engine
from encdec.whisper.audio import log_mel_spectrogram
from tests.tiny_models import make_hf_model
from tests.whisper.test_transcribe import _tone
from tests.whisper.tiny_whisper import EOT, MEL_BINS, PROMPT, SOT, SUPPRESS, SUPPRESS_BEGIN

MAX_NEW = 10
BEAM_CASES = [  # (num_beams, length_penalty, early_stopping, num_return_sequences)
    (2, 1.0, False, 1),
    (4, 0.0, True, 2),
    (5, 2.0, "never", 3),
    (4, -0.5, False, 4),
    (5, 1.0, True, 1),
    (2, 1.0, "never", 2),
]
FAMILY_CONFIG = {"t5": {"initializer_factor": 2.0}, "bart": {}, "mbart": {}, "marian": {}}
"""Tied embeddings (every real checkpoint of these families), varied outputs."""


def _config(**kw):
    base = dict(
        num_slots=8, page_size=4, max_encoder_len=20, max_new_tokens=MAX_NEW, encoder_buckets=(8, 16),
        steps_per_dispatch=3, max_encoder_batch=4, max_num_beams=5,
    )
    return EngineConfig(**{**base, **kw})


def _hf_config(cfg, k, lp, es, n, **kw):
    return tf.GenerationConfig(
        max_new_tokens=MAX_NEW, num_beams=k, length_penalty=lp, early_stopping=es, num_return_sequences=n,
        do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id, forced_bos_token_id=None, forced_eos_token_id=None,
        output_scores=True, return_dict_in_generate=True, **kw,
    )


def _assert_same_beams(out, hf_out, prompt_len, fill, case):
    """Our n-best equal HF's: tokens (HF pads finished ones with ``fill``), order and scores."""
    hf_seqs = [s[prompt_len:].tolist() for s in hf_out.sequences]
    assert len(out.sequences) == len(hf_seqs), case
    for ours, theirs in zip(out.sequences, hf_seqs, strict=True):
        n = len(ours.token_ids)
        assert ours.token_ids == theirs[:n] and set(theirs[n:]) <= set(fill), (case, ours.token_ids, theirs)
    scores = np.array([s.score for s in out.sequences])
    want = hf_out.sequences_scores.numpy()
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5, err_msg=str(case))
    assert out.token_ids == out.sequences[0].token_ids


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIG))
def test_beam_search_equals_hf_generate_in_a_mixed_batch(family, tmp_path):
    hf = make_hf_model(family, **FAMILY_CONFIG[family])
    hf.save_pretrained(str(tmp_path))
    model = encdec.load_pretrained(tmp_path)
    cfg = model.config
    rng = np.random.default_rng(1)
    inputs = [rng.integers(3, 90, int(rng.integers(2, 20))).tolist() for _ in BEAM_CASES]
    beams = [
        Request(ids, max_new_tokens=MAX_NEW, num_beams=k, length_penalty=lp, early_stopping=es,
                num_return_sequences=n, logprobs=0)
        for ids, (k, lp, es, n) in zip(inputs, BEAM_CASES, strict=True)
    ]
    greedy = Request(inputs[0], max_new_tokens=MAX_NEW)
    sampled = Request(inputs[1], max_new_tokens=MAX_NEW, temperature=1.0, seed=3)
    engine = Engine(model, _config())
    compiled = engine.warmup() if family == "t5" else None
    outs = engine.generate([beams[0], greedy, *beams[1:3], sampled, *beams[3:]])
    if compiled is not None:  # beams, samples and greedy share the warmed-up steps
        assert engine.compile_counts() == compiled
    outs = [outs[0], *outs[2:4], *outs[5:]], outs[1], outs[4]
    beam_outs, greedy_out, sampled_out = outs
    for req, out, case in zip(beams, beam_outs, BEAM_CASES, strict=True):
        with torch.no_grad():
            hf_out = hf.generate(
                torch.tensor([req.inputs]), attention_mask=torch.ones(1, len(req.inputs), dtype=torch.long),
                generation_config=_hf_config(cfg, *case),
            )
        _assert_same_beams(out, hf_out, 1, {cfg.pad_token_id, cfg.eos_token_id}, case)
        for seq in out.sequences:  # per-token log-probabilities sum to the unpenalized score
            lp = case[1]
            np.testing.assert_allclose(sum(seq.logprobs) / len(seq.token_ids) ** lp, seq.score, rtol=1e-5)
    # Greedy and sampled requests beside the beams give what they give alone.
    assert greedy_out.token_ids == engine.generate([greedy])[0].token_ids
    assert sampled_out.token_ids == engine.generate([sampled])[0].token_ids
    stats = engine.stats()
    assert (stats.self_pages_used, stats.cross_pages_used, stats.tracked_requests) == (0, 0, 0)
    engine.self_alloc.check_invariants()


def test_continued_beams_keep_their_slots_and_rows_move_only_into_ended_beams():
    rng = np.random.default_rng(0)
    K = 5
    for _ in range(200):
        k = int(rng.integers(1, K + 1))
        parent_K = np.r_[rng.integers(0, k, size=k), rng.integers(0, K, size=K - k)]  # ranked
        ranks = [int(r) for r in _places(jnp.asarray(parent_K)[None].repeat(K, 0),
                                         jnp.full(K, k), jnp.arange(K))][:k]
        assert sorted(ranks) == list(range(k))  # every continuation has one slot
        slot_parent = [int(parent_K[r]) for r in ranks]
        for beam in set(parent_K[:k].tolist()):  # its best continuation stays in its slot
            assert ranks[beam] == int(np.flatnonzero(parent_K[:k] == beam)[0])
        moved = [b for b in range(k) if slot_parent[b] != b]
        assert not set(moved) & {slot_parent[b] for b in moved}  # no slot is read and written

    # The in-place copy equals a gather when sources are not destinations.
    x = jnp.asarray(rng.normal(size=(6, 2, 4, 3)), jnp.float32)
    parent_B = jnp.asarray([0, 0, 2, 2, 0, 5])
    window = SlotWindow((x,), (x + 1,), (), ())
    moved = window.take_self_rows(parent_B)
    np.testing.assert_array_equal(moved.self_k_BNKH[0], x[parent_B])
    np.testing.assert_array_equal(moved.self_v_BNKH[0], (x + 1)[parent_B])


@pytest.mark.parametrize("impl", ["xla", "window"])
def test_whisper_beams_equal_hf_generate(tiny_hf_model, tiny_ct2_dir, impl):
    model = encdec.load_pretrained(tiny_ct2_dir)
    engine = whisper_engine(
        model, EngineConfig(num_slots=8, page_size=16, max_new_tokens=16, steps_per_dispatch=4,
                            attention_impl=impl, max_encoder_batch=2, max_num_beams=5),
    )
    clips = [_tone(s, f, i) for i, (s, f) in enumerate([(2.0, 300), (5.0, 900), (1.0, 2000)])]
    cases = [(5, 1.0, False, 2), (4, 0.5, True, 1), (2, 1.0, "never", 2)]
    requests = [
        Request(AudioInput(c), max_new_tokens=12, num_beams=k, length_penalty=lp, early_stopping=es,
                num_return_sequences=n)
        for c, (k, lp, es, n) in zip(clips, cases, strict=True)
    ]
    outs = engine.generate(requests)
    for clip, out, (k, lp, es, n) in zip(clips, outs, cases, strict=True):
        mel = log_mel_spectrogram(clip, MEL_BINS)[None]
        gc = tf.GenerationConfig(
            max_new_tokens=12, num_beams=k, length_penalty=lp, early_stopping=es, num_return_sequences=n,
            do_sample=False, eos_token_id=EOT, pad_token_id=EOT, decoder_start_token_id=SOT,
            suppress_tokens=SUPPRESS, begin_suppress_tokens=SUPPRESS_BEGIN, output_scores=True,
            return_dict_in_generate=True,
        )
        with torch.no_grad():
            hf_out = GenerationMixin.generate(
                tiny_hf_model, input_features=torch.tensor(np.asarray(mel)),
                decoder_input_ids=torch.tensor([PROMPT]), generation_config=gc,
            )
        _assert_same_beams(out, hf_out, len(PROMPT), {EOT}, (k, lp, es, n))
    assert engine.stats().self_pages_used == 0 and engine.stats().cross_pages_used == 0


def test_a_beam_request_holds_one_copy_of_the_cross_kv(tmp_path):
    hf = make_hf_model("t5", **FAMILY_CONFIG["t5"])
    hf.save_pretrained(str(tmp_path))
    model = encdec.load_pretrained(tmp_path)
    engine = Engine(model, _config(num_slots=4, page_size=16, max_encoder_len=512, encoder_buckets=(512,),
                                   max_encoder_batch=1, max_new_tokens=16))
    handle = engine.submit(Request(list(range(3, 90)) * 5 + [5] * 77, max_new_tokens=16, num_beams=4))
    engine.step()
    stats = engine.stats()
    assert stats.cross_pages_used == 512 // 16  # one sequence's 512 encoder positions
    assert stats.self_pages_used == 4 * 1  # each beam its own self pages (16 tokens: one page)
    assert stats.running_requests == 1
    engine.run_until_idle()
    assert engine.result(handle).finish_reason in ("stop", "length")
    assert engine.stats().cross_pages_used == 0


def test_n_samples_share_one_encode_and_differ(tmp_path):
    hf = make_hf_model("t5", **FAMILY_CONFIG["t5"])
    hf.save_pretrained(str(tmp_path))
    model = encdec.load_pretrained(tmp_path)
    engine = Engine(model, _config())
    req = Request([5, 9, 17, 33], max_new_tokens=MAX_NEW, temperature=1.5, seed=11, num_return_sequences=4,
                  logprobs=2)
    out = engine.generate([req])[0]
    assert engine.stats().encode_batches == 1
    samples = [tuple(s.token_ids) for s in out.sequences]
    assert len(samples) == 4 and len(set(samples)) > 1
    single = engine.generate([Request([5, 9, 17, 33], max_new_tokens=MAX_NEW, temperature=1.5, seed=11)])[0]
    assert list(samples[0]) == single.token_ids  # the first sample is the seed's own draw
    for s in out.sequences:
        assert len(s.logprobs) == len(s.token_ids) == len(s.top_logprobs)
        assert all(len(top) >= 2 for top in s.top_logprobs)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_beams": 9}, "num_beams=9 exceeds"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences=3 exceeds num_beams=2"),
        ({"num_beams": 2, "temperature": 0.7}, "beam search is greedy"),
        ({"num_return_sequences": 2}, "needs beam search"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": 0}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 40}, "could never apply"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"logprobs": 6}, "logprobs must be at most 5"),
        ({"suppress_tokens": [1, 500]}, "suppress_tokens has ids outside"),
        ({"stop": [""]}, "stop[0]"),
    ],
)
def test_bad_decoding_requests_fail_alone(tiny_models, fields, message):
    engine = Engine(tiny_models["t5"], _config())
    good = Request([5, 6, 7], max_new_tokens=4)
    bad = Request([5, 6, 7], max_new_tokens=4, **fields)
    outs = engine.generate([good, bad, good])
    assert outs[1].finish_reason == "error" and message in outs[1].error, outs[1].error
    assert outs[0].finish_reason != "error" and outs[0].token_ids == outs[2].token_ids
    with pytest.raises(RequestError, match="stream"):
        engine.stream(Request([5, 6], num_beams=2))
