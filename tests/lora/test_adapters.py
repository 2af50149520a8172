"""Adapter trees: initialisation, targets, merging, checks, dropout and per-row deltas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encdec
from encdec.lora import AdapterError, LoraConfig, check_adapter, init_lora, merge_adapter, unmerge_adapter
from encdec.lora.adapters import iter_adapters, join_trainable, split_trainable
from encdec.models.layers import lora_delta
from tests.lora import forward, random_batch, randomize_b, strict_rank_promotion  # noqa: F401 (autouse)
from tests.tiny_models import save_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in ("t5", "t5v1_1", "bart"):
        directory = tmp_path_factory.mktemp(family)
        save_hf_model(family, directory)
        out[family] = encdec.load_pretrained(directory)
    return out


def test_fresh_adapter_starts_as_the_base_model_with_peft_init(models):
    model = models["t5v1_1"]
    lora = init_lora(jax.random.PRNGKey(0), model.params, model.config, LoraConfig(rank=4, alpha=8))
    adapters = dict(iter_adapters(lora))
    q = adapters[("encoder", "layers", 0, "attn", "q")]
    o = adapters[("decoder", "layers", 1, "cross_attn", "o")]
    assert q["a"].shape == (32, 4) and q["b"].shape == (4, 4, 12)
    assert o["a"].shape == (4, 12, 4) and o["b"].shape == (4, 32)
    assert float(q["scale"]) == 2.0
    for ad in adapters.values():
        assert not np.any(np.asarray(ad["b"]))
        bound = 1 / np.sqrt(np.prod(ad["a"].shape[:-1]))  # kaiming_uniform(a=sqrt(5)) on [r, in]
        a = np.asarray(ad["a"])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    ids, mask, dec = random_batch(model.config)
    np.testing.assert_array_equal(
        forward(model.params, model.config, ids, mask, dec, lora),
        forward(model.params, model.config, ids, mask, dec),
    )


@pytest.mark.parametrize(
    "family,targets,expected",
    [
        ("t5", "all-linear", {"q", "k", "v", "o", "wi", "wo"}),
        ("t5v1_1", "all-linear", {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}),
        ("t5v1_1", ("q", "v"), {"q", "v"}),
        ("bart", ("q_proj", "fc2"), {"q", "wo"}),
    ],
)
def test_target_modules_pick_projections(models, family, targets, expected):
    model = models[family]
    lora = init_lora(
        jax.random.PRNGKey(0), model.params, model.config, LoraConfig(rank=2, target_modules=targets)
    )
    paths = [p for p, _ in iter_adapters(lora)]
    assert {p[-1] for p in paths} == expected
    cfg = model.config
    attention_blocks = cfg.encoder_layers + 2 * cfg.decoder_layers  # self- and cross-attention
    if targets == ("q", "v"):
        assert len(paths) == 2 * attention_blocks
    if targets == ("q_proj", "fc2"):
        assert len(paths) == attention_blocks + cfg.encoder_layers + cfg.decoder_layers


def test_unknown_target_modules_are_named(models):
    model = models["t5"]
    with pytest.raises(AdapterError, match=r"\['q_proj'\].*choose from q, k, v, o"):
        init_lora(jax.random.PRNGKey(0), model.params, model.config, LoraConfig(target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)


@pytest.mark.parametrize("family", ["t5v1_1", "bart"])
def test_merged_adapter_equals_unmerged(models, family):
    model = models[family]
    lora = init_lora(jax.random.PRNGKey(1), model.params, model.config, LoraConfig(rank=3, alpha=5))
    lora = randomize_b(lora, model.params)
    ids, mask, dec = random_batch(model.config)
    base = forward(model.params, model.config, ids, mask, dec)
    unmerged = forward(model.params, model.config, ids, mask, dec, lora)
    merged = forward(merge_adapter(model.params, lora), model.config, ids, mask, dec)
    assert np.abs(unmerged - base).max() > 1e-2  # the adapter really changes the outputs
    # Within 1e-5 of the logits' range (~30 for the untied T5): float32 round-off of (W + dW) x vs
    # W x + dW x measures 1e-5..2e-5 absolute there, whatever the adapter's size; a wrong layout or
    # scale is off by O(1).
    scale = max(1.0, float(np.abs(unmerged).max()))
    np.testing.assert_allclose(merged / scale, unmerged / scale, atol=1e-5, rtol=0)
    restored = unmerge_adapter(merge_adapter(model.params, lora), lora)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_check_adapter_names_the_bad_path(models):
    model, other = models["t5"], models["bart"]
    lora = init_lora(jax.random.PRNGKey(0), model.params, model.config, LoraConfig(rank=2))
    check_adapter(model.params, model.config, lora)
    with pytest.raises(AdapterError, match=r"encoder/layers/0/attn/q .*needs a"):
        check_adapter(other.params, other.config, lora)  # d_kv 12 vs BART's head width 8
    bad = jax.tree.map(lambda x: x, lora)
    bad["decoder"]["layers"][0]["attn"]["nope"] = bad["decoder"]["layers"][0]["attn"]["q"]
    with pytest.raises(AdapterError, match="decoder/layers/0/attn/nope: the base model has no projection"):
        check_adapter(model.params, model.config, bad)


def test_split_and_join_round_trip(models):
    model = models["bart"]
    lora = init_lora(jax.random.PRNGKey(0), model.params, model.config, LoraConfig(rank=2))
    weights, scales = split_trainable(lora, model.params)
    assert all(set(ad) == {"a", "b"} for _, ad in iter_adapters(weights))
    assert jax.tree.structure(join_trainable(weights, scales)) == jax.tree.structure(lora)


def test_dropout_touches_only_the_adapter_input():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    ad = {
        "a": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(2, 4, 5))),
        "scale": jnp.float32(2.0),
    }
    plain = lora_delta(ad, x, "BTD,DNH->BTNH")
    key = jax.random.PRNGKey(3)
    dropped = lora_delta({**ad, "dropout_key": key, "dropout_rate": 0.5}, x, "BTD,DNH->BTNH")
    again = lora_delta({**ad, "dropout_key": key, "dropout_rate": 0.5}, x, "BTD,DNH->BTNH")
    no_rate = lora_delta({**ad, "dropout_key": key, "dropout_rate": 0.0}, x, "BTD,DNH->BTNH")
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(again))
    np.testing.assert_allclose(np.asarray(no_rate), np.asarray(plain), rtol=1e-6)
    assert np.abs(np.asarray(dropped - plain)).max() > 1e-3
    # The masked input, rescaled by 1/keep, gives the same delta as feeding it in by hand.
    mask = jax.random.bernoulli(key, 0.5, x.shape)
    by_hand = lora_delta(ad, jnp.where(mask, x / 0.5, 0.0), "BTD,DNH->BTNH")
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(by_hand), rtol=1e-6)


@pytest.mark.parametrize(
    "eq,in_shape,out_shape", [("BTD,DNH->BTNH", (8,), (4, 5)), ("BTNH,NHD->BTD", (4, 5), (8,))]
)
def test_per_row_delta_equals_each_rows_own_adapter(eq, in_shape, out_shape):
    rng = np.random.default_rng(1)
    B, T, r = 3, 4, 2
    x = jnp.asarray(rng.normal(size=(B, T, *in_shape)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(B, *in_shape, r)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(B, r, *out_shape)), jnp.float32)
    scale = jnp.asarray([0.5, 2.0, 0.0], jnp.float32)
    rows = lora_delta({"a": a, "b": b, "scale": scale}, x, eq)
    for i in range(B):
        one = lora_delta({"a": a[i], "b": b[i], "scale": scale[i]}, x[i : i + 1], eq)
        np.testing.assert_allclose(np.asarray(rows[i : i + 1]), np.asarray(one), rtol=1e-5, atol=1e-6)
