"""Named shapes: real dimensions, and one cached checkpoint that encdec and HF both load."""

import json

import numpy as np
import pytest
import torch
import transformers as tf

import encdec
from encdec.bench import shapes
from encdec.config import ModelConfig


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.mark.parametrize(
    ("name", "family", "d_model", "layers", "heads", "ffn", "vocab"),
    [
        ("t5-small", "t5", 512, 6, 8, 2048, 32128),
        ("t5-base", "t5", 768, 12, 12, 3072, 32128),
        ("flan-t5-large", "t5", 1024, 24, 16, 2816, 32128),
        ("bart-base", "bart", 768, 6, 12, 3072, 50265),
        ("bart-large", "bart", 1024, 12, 16, 4096, 50265),
        ("pegasus-large", "pegasus", 1024, 16, 16, 4096, 96103),
        ("nllb-600m", "m2m_100", 1024, 12, 16, 4096, 256206),
    ],
)
def test_real_shapes_have_real_dimensions(name, family, d_model, layers, heads, ffn, vocab):
    shape = shapes.get_shape(name)
    assert shape.family == family
    hf_cls = tf.CONFIG_MAPPING[family]
    cfg = ModelConfig.from_hf(hf_cls(**shape.hf_config).to_dict())
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (d_model, layers, layers)
    assert cfg.decoder_heads == heads
    assert (cfg.decoder_ffn_dim, cfg.vocab_size) == (ffn, vocab)
    if name == "flan-t5-large":
        # transformers 5 always ties T5's head; v1.1 / Flan is told apart by not rescaling before it.
        assert cfg.gated_ffn and not cfg.tied_output_rescale and cfg.activation == "gelu_new"
    if family in ("pegasus", "m2m_100"):
        assert cfg.pre_norm and cfg.final_norm and cfg.embed_scale == 32.0 and cfg.activation == "relu"
        assert cfg.position == ("sinusoidal" if family == "pegasus" else "padded_sinusoidal")
    low, high = shape.token_range
    specials = {cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id}
    assert all(not low <= s < high for s in specials)


def test_unknown_shape():
    with pytest.raises(ValueError, match="unknown model shape"):
        shapes.get_shape("t5-huge")


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart"])
def test_checkpoint_is_written_once_and_loads_in_encdec_and_hf(name, cache):
    path = shapes.write_shape(name, seed=3, cache_dir=cache)
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    stamp = (path / "config.json").stat().st_mtime_ns
    assert shapes.write_shape(name, seed=3, cache_dir=cache) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert shapes.write_shape(name, seed=4, cache_dir=cache) != path

    model = encdec.load_pretrained(path)
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(str(path)).eval()
    assert model.config.vocab_size == shapes.get_shape(name).vocab_size
    assert model.config.d_model == hf.config.d_model
    # Identical weights: the same seed rebuilds the same model, and HF reads back what was written.
    fresh = shapes.build_hf_model(name, seed=3).state_dict()
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(value, fresh[key], rtol=0, atol=0)
    hf_key = "shared.weight" if name == "tiny-t5" else "model.shared.weight"
    np.testing.assert_array_equal(np.asarray(model.params["shared"]["embedding_VD"]), fresh[hf_key].numpy())


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart"])
def test_tokenizer_names_every_id_once(name, cache):
    path = shapes.write_shape(name, cache_dir=cache)
    tok = tf.AutoTokenizer.from_pretrained(str(path))
    vocab = tok.get_vocab()
    V = shapes.get_shape(name).vocab_size
    assert sorted(vocab.values()) == list(range(V))
    cfg = json.loads((path / "config.json").read_text())
    assert tok.eos_token_id == cfg["eos_token_id"] and tok.pad_token_id == cfg["pad_token_id"]


def test_random_weights_make_input_dependent_outputs(cache):
    model = encdec.load_pretrained(shapes.write_shape("tiny-t5", cache_dir=cache))
    rng = np.random.default_rng(0)
    inputs = [list(rng.integers(3, 500, 12)) for _ in range(4)]
    outs = encdec.reference_generate(model, inputs, 12, min_new_tokens=12)
    firsts = {o.token_ids[0] for o in outs}
    assert len(firsts) > 1 and len({t for o in outs for t in o.token_ids}) > 4


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart", "tiny-pegasus"])
def test_ct2_conversion_is_cached_and_keeps_the_vocabulary(name, cache):
    pytest.importorskip("ctranslate2")
    path = shapes.ct2_dir(name, cache_dir=cache)
    assert (path / "model.bin").exists()
    assert shapes.ct2_dir(name, cache_dir=cache) == path
    vocab = shapes.ct2_vocabulary(path)
    tok = tf.AutoTokenizer.from_pretrained(str(shapes.write_shape(name, cache_dir=cache)))
    assert vocab == tok.convert_ids_to_tokens(list(range(len(vocab))))


def test_ct2_conversion_refuses_unequal_head_counts(tmp_path):
    """CTranslate2's transformer spec has one head count; converting would silently misread."""
    config = {**shapes.get_shape("tiny-nllb").hf_config, "model_type": "m2m_100"}
    config["decoder_attention_heads"] = 2
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="encoder_attention_heads=4, decoder_attention_heads=2"):
        shapes.convert_ct2(tmp_path / "hf", tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()
