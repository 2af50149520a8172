"""encdec vs Hugging Face PyTorch on tiny random models of every supported family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import encdec
from encdec.models import decode, encode, init_dense_kv
from tests.tiny_models import FAMILIES, VOCAB, hf_generation_config, save_hf_model

LENGTHS = [7, 3, 11]  # a padded batch: rows of different lengths


def _batch(pad_id, seed=1, left_padded_row=None):
    """Right-padded rows; ``left_padded_row`` puts that row's tokens at the end instead."""
    rng = np.random.default_rng(seed)
    S = max(LENGTHS)
    ids = np.full((len(LENGTHS), S), pad_id, np.int64)
    mask = np.zeros((len(LENGTHS), S), np.int64)
    for i, n in enumerate(LENGTHS):
        where = slice(S - n, S) if i == left_padded_row else slice(0, n)
        ids[i, where] = rng.integers(3, VOCAB - 2, n)
        mask[i, where] = 1
    return ids, mask


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, directory)
    return hf, encdec.load_pretrained(directory)


def test_encoder_and_decoder_logits_match_hf(pair):
    """Teacher-forced, one row left-padded and a pad token last in the decoder input: M2M100/NLLB
    number only non-pad tokens (a left-padded row gets right-padded positions) and put pad
    tokens on the zero position row; the other families index positions by place."""
    hf, model = pair
    cfg = model.config
    ids, mask = _batch(cfg.pad_token_id, left_padded_row=1)
    dec_ids = np.random.default_rng(2).integers(3, VOCAB - 2, (ids.shape[0], 9))
    dec_ids[:, 0] = cfg.decoder_start_token_id
    dec_ids[:, -1] = cfg.pad_token_id
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec_ids),
            output_hidden_states=False,
        )
        hf_enc = hf.get_encoder()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state
    enc = encode(model.params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    np.testing.assert_allclose(np.asarray(enc), hf_enc.numpy(), atol=1e-4, rtol=0)

    kv = init_dense_kv(model.params, cfg, enc, jnp.asarray(mask, bool), dec_ids.shape[1])
    positions = jnp.broadcast_to(jnp.arange(dec_ids.shape[1], dtype=jnp.int32), dec_ids.shape)
    logits, _ = decode(model.params, cfg, jnp.asarray(dec_ids, jnp.int32), positions, kv)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4, rtol=0)


def test_step_by_step_decode_equals_teacher_forcing(pair):
    _, model = pair
    cfg = model.config
    ids, mask = _batch(cfg.pad_token_id)
    dec_ids = jnp.asarray(np.random.default_rng(3).integers(3, VOCAB - 2, (ids.shape[0], 6)), jnp.int32)
    enc = encode(model.params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    kv = init_dense_kv(model.params, cfg, enc, jnp.asarray(mask, bool), 6)
    full, _ = decode(model.params, cfg, dec_ids, jnp.broadcast_to(jnp.arange(6), dec_ids.shape), kv)
    steps = []
    for t in range(6):
        logits, kv = decode(model.params, cfg, dec_ids[:, t : t + 1], jnp.full((3, 1), t, jnp.int32), kv)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), atol=1e-5, rtol=0)


def test_greedy_tokens_match_hf_for_32_steps(pair):
    hf, model = pair
    cfg = model.config
    ids, mask = _batch(cfg.pad_token_id, seed=4)
    use_cache = hf.config.model_type not in ("t5", "mt5", "umt5") or cfg.encoder_layers == cfg.decoder_layers
    with torch.no_grad():
        hf_out = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            generation_config=hf_generation_config(hf, 32, VOCAB + 7),
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
    inputs = [list(r[m > 0]) for r, m in zip(ids, mask, strict=True)]
    ours, logits = encdec.reference_generate(model, inputs, 32, eos_token_id=-1, return_logits=True)
    for row, out in zip(hf_out.sequences.numpy(), ours, strict=True):
        assert out.token_ids == row[1:].tolist()
        assert len(out.token_ids) == 32
    # Tiny random models repeat themselves, so tokens alone prove little: every step's logits
    # along the generated path must match too.
    hf_logits = torch.stack(hf_out.logits, dim=1).numpy()
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)


# Their bfloat16 code paths are T5's and Marian's (per-layer tables, sinusoidal positions);
# skipped to keep CI time (M2M100's position rows, new code, stay in).
_BF16_COVERED_ELSEWHERE = ("umt5", "pegasus")


def test_bfloat16_stays_close_to_float32(pair, tmp_path):
    _, model32 = pair
    if model32.config.model_type in _BF16_COVERED_ELSEWHERE:
        pytest.skip("same bfloat16 code path as T5 (per-layer tables aside) or Marian")
    model16 = encdec.load_pretrained(model32.path, dtype="bfloat16")
    cfg = model32.config
    ids, mask = _batch(cfg.pad_token_id)
    enc32 = encode(model32.params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    enc16 = encode(
        model16.params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool), dtype=jnp.bfloat16
    )
    assert enc16.dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits (~0.4% relative); a few layers compound it: allow 5% of
    # the activations' scale, which a wrong cast or missed float32 accumulation would exceed.
    scale = float(jnp.max(jnp.abs(enc32)))
    err = float(jnp.max(jnp.abs(enc16.astype(jnp.float32) - enc32)))
    assert err < 0.05 * scale, (err, scale)
    out16 = encdec.reference_generate(model16, [list(ids[0][: LENGTHS[0]])], 4, eos_token_id=-1)
    assert len(out16[0].token_ids) == 4


def test_jit_and_eager_agree(pair):
    _, model = pair
    cfg = model.config
    ids, mask = _batch(cfg.pad_token_id)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    eager = encode(model.params, cfg, *args)
    jitted = jax.jit(encode, static_argnums=1)(model.params, cfg, *args)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
