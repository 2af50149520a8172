"""Loading the BART-like families: untied tables as transformers 5 saves them, tolerated gaps,
the forced-BOS id, and the head-count rules."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import encdec
from encdec.config import ModelConfig, UnsupportedModelError
from tests.lora import forward
from tests.tiny_models import make_hf_model, save_hf_model


def _hf_and_ours(hf, model, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 90, (2, 7))
    dec = rng.integers(4, 90, (2, 5))
    dec[:, 0] = model.config.decoder_start_token_id
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = forward(model.params, model.config, ids, np.ones_like(ids), dec)
    return ours, theirs


def test_untied_tables_are_read_per_stack(tmp_path):
    """transformers 5 unties ``shared``, both ``embed_tokens`` and the head when
    tie_word_embeddings is false; each stack must read its own table."""
    hf = save_hf_model("m2m_100", tmp_path, config={"tie_word_embeddings": False})
    model = encdec.load_pretrained(tmp_path)
    assert not np.array_equal(hf.model.encoder.embed_tokens.weight.detach(), hf.model.shared.weight.detach())
    for stack in ("encoder", "decoder"):
        np.testing.assert_array_equal(
            np.asarray(model.params[stack]["embedding_VD"]),
            getattr(hf.model, stack).embed_tokens.weight.detach().numpy(),
        )
    ours, theirs = _hf_and_ours(hf, model)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_equal_copies_share_one_table_and_a_missing_logits_bias_is_zero(tmp_path):
    """Older files hold the shared table three times; BART-family files may lack final_logits_bias."""
    hf = save_hf_model("pegasus", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    shared = tensors["model.shared.weight"]
    assert "model.encoder.embed_tokens.weight" not in tensors  # tied: saved once
    tensors["model.encoder.embed_tokens.weight"] = shared.copy()
    tensors["model.decoder.embed_tokens.weight"] = shared.copy()
    tensors["lm_head.weight"] = shared.copy()
    del tensors["final_logits_bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    model = encdec.load_pretrained(tmp_path)
    assert "embedding_VD" not in model.params["encoder"] and "embedding_VD" not in model.params["decoder"]
    assert not np.asarray(model.params["final_logits_bias_V"]).any()
    ours, theirs = _hf_and_ours(hf, model)  # hf's final_logits_bias is zeros at init too
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_forced_bos_token_id_from_config_or_generation_config(tmp_path):
    hf = make_hf_model("m2m_100")
    hf.generation_config.forced_bos_token_id = 93
    hf.save_pretrained(str(tmp_path))
    assert "forced_bos_token_id" not in json.loads((tmp_path / "config.json").read_text())
    assert encdec.load_pretrained(tmp_path).config.forced_bos_token_id == 93
    config = json.loads((tmp_path / "config.json").read_text())
    assert ModelConfig.from_hf({**config, "forced_bos_token_id": 0}).forced_bos_token_id == 0
    assert ModelConfig.from_hf(config).forced_bos_token_id is None


@pytest.mark.parametrize("model_type", ["bart", "mbart", "marian", "pegasus", "m2m_100"])
def test_head_counts_may_differ_but_must_divide_d_model(model_type):
    base = {
        "model_type": model_type,
        "vocab_size": 16,
        "d_model": 24,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_ffn_dim": 8,
        "decoder_ffn_dim": 8,
    }
    cfg = ModelConfig.from_hf({**base, "encoder_attention_heads": 8, "decoder_attention_heads": 2})
    assert (cfg.encoder_heads, cfg.encoder_head_dim, cfg.decoder_heads, cfg.head_dim) == (8, 3, 2, 12)
    # HF's attention raises on these too (head_dim = d_model / heads).
    with pytest.raises(UnsupportedModelError, match="not divisible by decoder_attention_heads=5"):
        ModelConfig.from_hf({**base, "encoder_attention_heads": 8, "decoder_attention_heads": 5})


def test_bart_with_unequal_head_counts_matches_hf(tmp_path):
    """BART itself (mBART, Marian, Pegasus and M2M100 in tests/models/test_parity.py)."""
    hf = save_hf_model("bart", tmp_path, config={"encoder_attention_heads": 8, "decoder_attention_heads": 2})
    model = encdec.load_pretrained(tmp_path)
    assert (model.config.encoder_head_dim, model.config.head_dim) == (4, 16)
    ours, theirs = _hf_and_ours(hf, model)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
