"""AdapterBank: per-row adapters in one batch, in-place load/unload, and its errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encdec
from encdec.lora import AdapterBank, AdapterError, LoraConfig, init_lora, merge_adapter
from tests.lora import _forward, forward, random_batch, randomize_b, strict_rank_promotion  # noqa: F401 (autouse)
from tests.tiny_models import save_hf_model


@pytest.fixture(scope="module", params=["t5v1_1", "bart"])
def setup(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, directory)
    model = encdec.load_pretrained(directory)
    cfg = model.config
    first = "q" if cfg.is_t5 else "q_proj"
    second = ("v", "wo") if cfg.is_t5 else ("v_proj", "fc2")
    ad1 = randomize_b(
        init_lora(jax.random.PRNGKey(1), model.params, cfg, LoraConfig(rank=4, alpha=8)), model.params, 1
    )
    ad2 = randomize_b(
        init_lora(
            jax.random.PRNGKey(2),
            model.params,
            cfg,
            LoraConfig(rank=2, alpha=7, target_modules=(first, *second)),
        ),
        model.params,
        2,
        std=0.5,
    )
    return model, ad1, ad2


def test_rows_with_different_adapters_match_each_adapter_merged_alone(setup):
    model, ad1, ad2 = setup
    cfg = model.config
    bank = AdapterBank(model.params, cfg, capacity=3, max_rank=4)
    bank.load("one", ad1)
    bank.load("two", ad2)
    names = ["one", "two", None, "two", "one"]
    rows = bank.rows_for(names)
    assert rows.dtype == np.int32 and rows.tolist() == [1, 2, 0, 2, 1]
    ids, mask, dec = random_batch(cfg, lengths=(5, 3, 7, 6, 2))
    mixed = forward(model.params, cfg, ids, mask, dec, bank.gather(rows))
    expected = {
        "one": forward(merge_adapter(model.params, ad1), cfg, ids, mask, dec),
        "two": forward(merge_adapter(model.params, ad2), cfg, ids, mask, dec),
        None: forward(model.params, cfg, ids, mask, dec),
    }
    assert np.abs(expected["one"] - expected["two"]).max() > 1e-1
    for i, name in enumerate(names):
        scale = max(1.0, float(np.abs(expected[name][i]).max()))
        np.testing.assert_allclose(
            mixed[i] / scale, expected[name][i] / scale, atol=1e-5, rtol=0, err_msg=f"row {i}"
        )
    # The reference generator takes the same per-row tree (compared with merged models, batched;
    # one family is enough: the generator is family-agnostic).
    if not cfg.is_t5:
        return
    inputs = [list(r[m > 0]) for r, m in zip(ids, mask, strict=True)]
    per_row, per_row_logits = encdec.reference_generate(
        model, inputs, 4, eos_token_id=-1, lora=bank.gather(rows), return_logits=True
    )
    merged_models = {
        None: model,
        "one": dataclasses.replace(model, params=merge_adapter(model.params, ad1)),
        "two": dataclasses.replace(model, params=merge_adapter(model.params, ad2)),
    }
    for name, merged in merged_models.items():
        alone, logits = encdec.reference_generate(merged, inputs, 4, eos_token_id=-1, return_logits=True)
        for i in [i for i, n in enumerate(names) if n == name]:
            assert per_row[i].token_ids == alone[i].token_ids, f"row {i}"
            scale = max(1.0, float(np.abs(logits[i]).max()))
            np.testing.assert_allclose(
                per_row_logits[i] / scale, logits[i] / scale, atol=1e-5, err_msg=f"row {i}"
            )


def test_load_and_unload_keep_shapes_and_compile_nothing_new(setup):
    model, ad1, ad2 = setup
    cfg = model.config
    bank = AdapterBank(model.params, cfg, capacity=2, max_rank=4)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), bank.stacked)
    ids, mask, dec = random_batch(cfg, lengths=(4, 2))
    rows = jnp.asarray([0, 1], jnp.int32)
    _forward._clear_cache()
    base = forward(model.params, cfg, ids, mask, dec, bank.gather(rows))
    assert bank.load("one", ad1) == 1
    with_one = forward(model.params, cfg, ids, mask, dec, bank.gather(rows))
    bank.unload("one")
    assert bank.load("two", ad2) == 1  # the freed row is reused
    with_two = forward(model.params, cfg, ids, mask, dec, bank.gather(rows))
    bank.load("two", ad1)  # reloading an id overwrites its row
    reloaded = forward(model.params, cfg, ids, mask, dec, bank.gather(rows))
    bank.unload("two")
    after = forward(model.params, cfg, ids, mask, dec, bank.gather(rows))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), bank.stacked) == shapes
    assert _forward._cache_size() == 1  # one compilation for every bank state
    np.testing.assert_array_equal(base[0], with_one[0])  # row 0 stays "no adapter"
    assert np.abs(with_one[1] - base[1]).max() > 1e-2 and np.abs(with_two[1] - with_one[1]).max() > 1e-2
    np.testing.assert_allclose(reloaded, with_one, atol=1e-6)
    np.testing.assert_array_equal(after, base)  # unloading zeroes the row
    assert len(bank) == 0


def test_bank_errors(setup, tmp_path):
    model, ad1, ad2 = setup
    cfg = model.config
    bank = AdapterBank(model.params, cfg, capacity=1, max_rank=3)
    with pytest.raises(AdapterError, match="rank 4 .* above the bank's max_rank 3"):
        bank.load("one", ad1)
    bank.load("two", ad2)
    with pytest.raises(AdapterError, match="bank is full"):
        bank.load("three", ad2)
    with pytest.raises(AdapterError, match="unknown adapter id 'nope'"):
        bank.rows_for(["two", "nope"])
    with pytest.raises(AdapterError, match="unknown adapter id 'one'"):
        bank.unload("one")
    # An adapter made for another base model.
    other_family = "bart" if cfg.is_t5 else "t5v1_1"
    save_hf_model(other_family, tmp_path)
    other = encdec.load_pretrained(tmp_path)
    foreign = init_lora(jax.random.PRNGKey(0), other.params, other.config, LoraConfig(rank=2))
    big = AdapterBank(model.params, cfg, capacity=2, max_rank=4)
    with pytest.raises(AdapterError, match="needs a|no projection there"):
        big.load("foreign", foreign)
    # A bank built for some targets refuses an adapter on others.
    narrow = AdapterBank(
        model.params, cfg, capacity=2, max_rank=4, target_modules=("q",) if cfg.is_t5 else ("q_proj",)
    )
    with pytest.raises(AdapterError, match="which this bank does not hold"):
        narrow.load("two", ad2)
    assert len(big) == 0 and len(narrow) == 0
