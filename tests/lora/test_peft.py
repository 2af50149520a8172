"""PEFT parity: the same adapter applied by ``peft`` to the HF PyTorch model and by encdec.

Both directions: encdec -> PEFT files -> ``PeftModel.from_pretrained``, and a random ``peft``
adapter (nonzero B) -> ``save_pretrained`` -> :func:`encdec.lora.load_peft`.
"""

import json

import jax
import numpy as np
import peft
import pytest
import torch

import encdec
from encdec.lora import AdapterError, LoraConfig, init_lora, load_peft, save_peft
from encdec.lora.adapters import iter_adapters
from tests.lora import forward, random_batch, randomize_b, strict_rank_promotion  # noqa: F401 (autouse)
from tests.tiny_models import make_hf_model, save_hf_model

FAMILIES = {
    "t5v1_1": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "t5": ["q", "v", "wi", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, directory)
    return request.param, directory, encdec.load_pretrained(directory)


def _hf_logits(hf, ids, mask, dec):
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
        )
    return out.logits.numpy()


def test_encdec_adapter_loads_in_peft_with_the_same_logits(pair, tmp_path):
    family, _, model = pair
    cfg = model.config
    lc = LoraConfig(rank=4, alpha=6, target_modules=tuple(FAMILIES[family]))
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), model.params, cfg, lc), model.params, std=0.2)
    save_peft(tmp_path / "adapter", lora, cfg, lora_config=lc)
    ids, mask, dec = random_batch(cfg)
    ours = forward(model.params, cfg, ids, mask, dec, lora)
    hf = make_hf_model(family)
    base = _hf_logits(hf, ids, mask, dec)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    theirs = _hf_logits(peft_model, ids, mask, dec)
    assert np.abs(theirs - base).max() > 1e-2  # peft really applied the adapter
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "rslora_and_patterns"])
def test_peft_adapter_imports_with_the_same_logits(pair, tmp_path, variant):
    family, _, model = pair
    cfg = model.config
    hf = make_hf_model(family)
    torch.manual_seed(7)
    options = {}
    if variant == "rslora_and_patterns":
        first = FAMILIES[family][0]
        options = dict(use_rslora=True, rank_pattern={first: 2}, alpha_pattern={FAMILIES[family][-1]: 3.0})
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=FAMILIES[family],
        task_type="SEQ_2_SEQ_LM",
        init_lora_weights=False,
        **options,
    )
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, dec = random_batch(cfg)
    theirs = _hf_logits(peft_model, ids, mask, dec)

    lora, lc = load_peft(tmp_path / "adapter", model.params, cfg)
    ours = forward(model.params, cfg, ids, mask, dec, lora)
    # Logits reach ~10 here: float32 rounding of two summation orders is ~1e-5 of that.
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=2e-5)
    assert lc.rank == 4 and lc.alpha == 8 and lc.use_rslora == (variant != "plain")
    ranks = {ad["a"].shape[-1] for _, ad in iter_adapters(lora)}
    assert ranks == ({4} if variant == "plain" else {2, 4})

    # And back out: encdec's export of the imported adapter is the same adapter for peft.
    save_peft(tmp_path / "again", lora, cfg, lora_config=lc)
    again = peft.PeftModel.from_pretrained(make_hf_model(family), str(tmp_path / "again")).eval()
    np.testing.assert_allclose(_hf_logits(again, ids, mask, dec), theirs, atol=1e-5, rtol=0)


def test_peft_key_names_follow_peft(pair, tmp_path):
    family, _, model = pair
    lc = LoraConfig(rank=2, target_modules=(FAMILIES[family][0],))
    save_peft(
        tmp_path,
        init_lora(jax.random.PRNGKey(0), model.params, model.config, lc),
        model.config,
        lora_config=lc,
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        keys = set(f.keys())
    if family.startswith("t5"):
        assert "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
        assert "base_model.model.decoder.block.1.layer.1.EncDecAttention.q.lora_B.weight" in keys
    else:
        assert "base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert "base_model.model.model.decoder.layers.1.encoder_attn.q_proj.lora_B.weight" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        FAMILIES[family][0]
    ]


def test_import_errors_name_the_problem(pair, tmp_path, tmp_path_factory):
    family, _, model = pair
    if family != "bart":
        pytest.skip("one family is enough for the error paths")
    other_dir = tmp_path_factory.mktemp("t5_for_errors")
    save_hf_model("t5v1_1", other_dir)
    other = encdec.load_pretrained(other_dir)
    lc = LoraConfig(rank=2)
    save_peft(
        tmp_path / "t5_adapter",
        init_lora(jax.random.PRNGKey(0), other.params, other.config, lc),
        other.config,
        lora_config=lc,
    )
    with pytest.raises(AdapterError, match="names module .*which this bart model does not have"):
        load_peft(tmp_path / "t5_adapter", model.params, model.config)

    save_peft(
        tmp_path / "dora", init_lora(jax.random.PRNGKey(0), model.params, model.config, lc), model.config
    )
    cfg_file = tmp_path / "dora" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        load_peft(tmp_path / "dora", model.params, model.config)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_peft(tmp_path, model.params, model.config)


NEW_FAMILIES = {
    "m2m_100": FAMILIES["bart"],  # NLLB; unequal encoder/decoder head counts in the tiny config
    "pegasus": FAMILIES["bart"],
    "umt5": FAMILIES["t5v1_1"],
}


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_peft_round_trip_of_the_newer_families(family, tmp_path):
    """A ``peft`` adapter on every projection imports with PEFT's logits and exports back to them."""
    save_hf_model(family, tmp_path / "base")
    model = encdec.load_pretrained(tmp_path / "base")
    cfg = model.config
    torch.manual_seed(7)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=NEW_FAMILIES[family],
        task_type="SEQ_2_SEQ_LM",
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(make_hf_model(family), config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, dec = random_batch(cfg)
    theirs = _hf_logits(peft_model, ids, mask, dec)
    lora, lc = load_peft(tmp_path / "adapter", model.params, cfg)
    assert {p[-1] for p, _ in iter_adapters(lora)} >= {"q", "k", "v", "o", "wo"}
    np.testing.assert_allclose(forward(model.params, cfg, ids, mask, dec, lora), theirs, atol=1e-4, rtol=0)
    save_peft(tmp_path / "again", lora, cfg, lora_config=lc)
    again = peft.PeftModel.from_pretrained(make_hf_model(family), str(tmp_path / "again")).eval()
    np.testing.assert_allclose(_hf_logits(again, ids, mask, dec), theirs, atol=1e-5, rtol=0)
