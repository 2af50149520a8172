"""float16 T5: the FFN output and the residual sum outgrow float16 (65,504); encdec keeps them in
float32 as HF does (``_keep_in_fp32_modules = ["wo"]``), so a model whose activations overflow
float16 still computes what its float32 self and HF's float16 model compute."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import encdec
from encdec.models import decode, encode, init_dense_kv
from tests.tiny_models import make_hf_model

WO_GAIN = 3e4  # FFN outputs ~1e5, past float16's range; the weights themselves stay in range


@pytest.fixture(scope="module")
def loud_t5(tmp_path_factory):
    """A tiny T5 v1.1 whose FFN outputs overflow float16 in every layer."""
    hf = make_hf_model("t5v1_1")
    with torch.no_grad():
        for stack in (hf.encoder, hf.decoder):
            for block in stack.block:
                block.layer[-1].DenseReluDense.wo.weight.mul_(WO_GAIN)
    directory = tmp_path_factory.mktemp("loud_t5")
    hf.save_pretrained(str(directory))
    return directory


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, (2, 9))
    return jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool), ids


def test_float16_t5_stays_finite_and_close_to_float32_and_hf(loud_t5):
    m32 = encdec.load_pretrained(loud_t5)
    m16 = encdec.load_pretrained(loud_t5, dtype="float16")
    assert m16.config.float16_residual_in_float32
    ids, mask, ids_np = _batch()
    enc32 = encode(m32.params, m32.config, ids, mask)
    enc16 = encode(m16.params, m16.config, ids, mask, dtype=jnp.float16)
    assert enc16.dtype == jnp.float16 and bool(jnp.isfinite(enc16).all())
    scale = float(jnp.max(jnp.abs(enc32)))
    assert float(jnp.max(jnp.abs(enc16.astype(jnp.float32) - enc32))) < 0.01 * scale

    # Without the float32 residual the same weights overflow: the mechanism is what keeps it finite.
    naive_cfg = dataclasses.replace(m16.config, float16_residual_in_float32=False)
    assert not bool(jnp.isfinite(encode(m16.params, naive_cfg, ids, mask, dtype=jnp.float16)).all())

    # Teacher-forced logits against float32 and against HF's own float16 model (``wo`` kept in
    # float32), on the same decoder inputs.
    dec = np.random.default_rng(1).integers(3, 90, (2, 6))
    dec[:, 0] = m16.config.decoder_start_token_id
    logits32 = _logits(m32, enc32, mask, dec, jnp.float32)
    logits16 = _logits(m16, enc16, mask, dec, jnp.float16)
    scale = np.abs(logits32).max()
    assert np.isfinite(logits16).all() and np.abs(logits16 - logits32).max() < 0.01 * scale
    hf16 = tf.T5ForConditionalGeneration.from_pretrained(str(loud_t5), dtype=torch.float16).eval()
    assert hf16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    with torch.no_grad():
        theirs = hf16(input_ids=torch.tensor(ids_np), decoder_input_ids=torch.tensor(dec)).logits
    theirs = theirs.float().numpy()
    assert np.isfinite(theirs).all()
    np.testing.assert_allclose(logits16, theirs, atol=0.01 * scale, rtol=0)


def _logits(model, enc, mask, dec, dtype):
    kv = init_dense_kv(model.params, model.config, enc, mask, dec.shape[1], dtype=dtype)
    positions = jnp.broadcast_to(jnp.arange(dec.shape[1], dtype=jnp.int32), dec.shape)
    logits, _ = decode(model.params, model.config, jnp.asarray(dec, jnp.int32), positions, kv, dtype=dtype)
    return np.asarray(logits, np.float32)
