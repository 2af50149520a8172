"""encdec's Whisper vs Hugging Face's ``WhisperForConditionalGeneration`` on a tiny random model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.utils import GenerationMixin

import encdec
from encdec.models import decode, init_dense_kv
from encdec.models.whisper import encode_audio, init_head_major_kv, sinusoids
from encdec.whisper.tokens import WhisperTokens
from encdec.whisper.transcribe import greedy_decode
from tests.whisper.tiny_whisper import (
    EOT,
    PROMPT,
    SUPPRESS,
    SUPPRESS_BEGIN,
    VOCAB,
    hf_greedy_config,
    random_mel,
)


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return encdec.load_pretrained(tiny_hf_dir)


def test_config_from_hf(model):
    cfg = model.config
    assert (cfg.model_type, cfg.num_mel_bins, cfg.audio_positions, cfg.max_positions) == (
        "whisper",
        16,
        1500,
        40,
    )
    assert cfg.learned_position_offset == 0 and cfg.pre_norm and cfg.final_norm and cfg.is_audio
    assert cfg.max_source_positions == 1500
    assert "b" not in model.params["decoder"]["layers"][0]["attn"]["k"]  # Whisper's keys have no bias


def test_encoder_and_decoder_logits_match_hf(tiny_hf_model, model):
    mel = random_mel(2, seed=1)
    dec_ids = np.random.default_rng(2).integers(0, VOCAB, (2, 11))
    dec_ids[:, :4] = PROMPT
    with torch.no_grad():
        hf_enc = tiny_hf_model.get_encoder()(torch.tensor(mel)).last_hidden_state.numpy()
        hf_logits = tiny_hf_model(
            input_features=torch.tensor(mel), decoder_input_ids=torch.tensor(dec_ids)
        ).logits
    enc = encode_audio(model.params, model.config, jnp.asarray(mel))
    np.testing.assert_allclose(np.asarray(enc), hf_enc, atol=1e-4, rtol=0)
    positions = jnp.broadcast_to(jnp.arange(dec_ids.shape[1], dtype=jnp.int32), dec_ids.shape)
    mask = jnp.ones(enc.shape[:2], bool)
    for kv in (
        init_dense_kv(model.params, model.config, enc, mask, dec_ids.shape[1]),
        init_head_major_kv(model.params, model.config, enc, mask, dec_ids.shape[1]),
    ):
        logits, _ = decode(model.params, model.config, jnp.asarray(dec_ids, jnp.int32), positions, kv)
        np.testing.assert_allclose(np.asarray(logits), hf_logits.numpy(), atol=1e-4, rtol=0)


def test_head_major_kv_step_by_step_equals_teacher_forcing(model):
    cfg = model.config
    enc = encode_audio(model.params, cfg, jnp.asarray(random_mel(2, seed=3)))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 6)), jnp.int32)
    mask = jnp.ones(enc.shape[:2], bool)
    full, _ = decode(
        model.params,
        cfg,
        ids,
        jnp.broadcast_to(jnp.arange(6), ids.shape),
        init_dense_kv(model.params, cfg, enc, mask, 6),
    )
    kv = init_head_major_kv(model.params, cfg, enc, mask, 6)
    steps = []
    for t in range(6):
        logits, kv = decode(model.params, cfg, ids[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), kv)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), atol=1e-4, rtol=0)


def test_greedy_tokens_with_suppression_match_hf(tiny_hf_model, model, tiny_hf_dir):
    mel = random_mel(3, seed=5)
    max_new = 20
    with torch.no_grad():
        # The generic generate (not Whisper's override) with HF's own suppression processors.
        hf_out = GenerationMixin.generate(
            tiny_hf_model,
            input_features=torch.tensor(mel),
            decoder_input_ids=torch.tensor([PROMPT] * 3),
            generation_config=hf_greedy_config(max_new),
        ).numpy()[:, len(PROMPT) :]
    tokens = WhisperTokens.from_dir(tiny_hf_dir)
    assert tokens.prompt("en") == PROMPT
    assert (tokens.suppress, tokens.suppress_begin) == (tuple(SUPPRESS), tuple(SUPPRESS_BEGIN))
    ours, stopped, logits = greedy_decode(
        model, mel, tokens, PROMPT, max_new_tokens=max_new, return_logits=True
    )
    for row, toks, stop in zip(hf_out, ours, stopped, strict=True):
        expected = row.tolist()
        expected = expected[: expected.index(EOT)] if EOT in expected else expected
        assert toks == expected
        assert bool(stop) == (len(toks) < max_new)
        assert not set(toks) & set(SUPPRESS)
    assert logits.shape[0] == 3 and logits.shape[2] == VOCAB
    assert all(toks[0] != 2 for toks in ours)  # banned at the first step only ...
    assert any(2 in toks for toks in ours)  # ... and chosen later
    # Suppression had work to do: without it greedy picks other tokens.
    free = dataclasses.replace(tokens, suppress=(), suppress_begin=())
    unsuppressed, _ = greedy_decode(model, mel, free, PROMPT, max_new_tokens=max_new)
    assert all(u != o for u, o in zip(unsuppressed, ours, strict=True))


def test_jit_and_eager_encoder_agree(model):
    mel = jnp.asarray(random_mel(1, seed=6))
    eager = encode_audio(model.params, model.config, mel)
    jitted = jax.jit(encode_audio, static_argnums=1)(model.params, model.config, mel)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_encoder_positions_are_whispers_sinusoids(model):
    # The checkpoint's table was computed in float32 (angles up to 1,500 rad): compare loosely.
    np.testing.assert_allclose(
        np.asarray(model.params["encoder"]["pos_embedding_KD"]), sinusoids(1500, 32), atol=1e-4
    )


def test_wrong_mel_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match="expected \\[B, 16, 3000\\]"):
        encode_audio(model.params, model.config, jnp.zeros((1, 80, 3000)))
