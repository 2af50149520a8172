"""An engine's packed weights (encdec.models.packing): int8 projections as the kernel's tiles and
a float32 head packed as panels beside its weight give the unpacked tree's logits, the engine
decodes with them, and nothing is packed where no kernel reads it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encdec
from encdec.engine import Engine, EngineConfig, Request
from encdec.models import decode, encode, init_dense_kv
from encdec.models.packing import PACK_ENV, engine_params
from encdec.models.quant import METHOD_ENV
from pallas_kernels.decode_matmul import build as decode_build
from pallas_kernels.decode_matmul import unpack_panels
from pallas_kernels.int8_matmul import build as int8_build
from tests.tiny_models import save_hf_model

# T5 at initializer_factor 1 (see test_quant), tied BART, and T5 v1.1's untied head.
CONFIGS = {
    "t5": ("t5", {"initializer_factor": 1.0}),
    "bart": ("bart", {}),
    "t5v1_1": ("t5v1_1", {"initializer_factor": 1.0}),
}
IDS, MAX_NEW = [5, 17, 3, 40, 22, 9], 6


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    family, config = CONFIGS[request.param]
    d = tmp_path_factory.mktemp(f"packing_{request.param}")
    save_hf_model(family, d, config=config)
    return encdec.load_pretrained(d), encdec.load_pretrained(d, quantize="int8")


def _paths(tree, name):
    return [k for k, _ in jax.tree_util.tree_leaves_with_path(tree) if getattr(k[-1], "key", None) == name]


def _logits(params, cfg):
    ids_BS = jnp.asarray([IDS], jnp.int32)
    mask_BS = jnp.ones(ids_BS.shape, bool)
    enc = encode(params, cfg, ids_BS, mask_BS)
    toks = [cfg.decoder_start_token_id, 7, 3, 11]
    kv = init_dense_kv(params, cfg, enc, mask_BS, len(toks))
    positions = jnp.arange(len(toks), dtype=jnp.int32)[None]
    return np.asarray(decode(params, cfg, jnp.asarray([toks], jnp.int32), positions, kv)[0][0])


def _engine_tokens(model):
    cfg = EngineConfig(num_slots=2, page_size=4, max_encoder_len=len(IDS), max_new_tokens=MAX_NEW)
    engine = Engine(model, cfg)
    out = engine.generate([Request(inputs=IDS, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)])
    return engine, out[0].token_ids


@pytest.mark.skipif(bool(int8_build.cpu_missing()), reason="no int8 CPU kernel here")
def test_int8_weights_are_packed_as_tiles_and_give_the_same_logits(pair, monkeypatch):
    """Every int8 projection becomes tiles (a tied head's table too, beside the embedding), with
    the same int32 sums; the model's own tree is untouched, and the engine decodes with tiles to
    the tokens of the unpacked tree."""
    monkeypatch.setenv(METHOD_ENV, "kernel")
    _, q = pair
    cfg = q.config
    packed = engine_params(q.params, cfg)
    assert len(_paths(packed, "w_tiles")) == len(_paths(q.params, "w")) > 0 and not _paths(packed, "w")
    assert len(_paths(packed, "head_tiles")) == int(cfg.tie_word_embeddings)
    assert _paths(q.params, "w") and not _paths(q.params, "w_tiles")
    np.testing.assert_allclose(_logits(packed, cfg), _logits(q.params, cfg), rtol=1e-5, atol=1e-5)
    if cfg.tie_word_embeddings:  # the head reads the packed table, not the embedding
        owner = _paths(packed, "head_tiles")[0][0].key
        zero_tiles = jnp.zeros_like(packed[owner]["head_tiles"])
        zeroed = {**packed, owner: {**packed[owner], "head_tiles": zero_tiles}}
        assert not _logits(zeroed, cfg).any()
    engine, tokens = _engine_tokens(q)
    assert _paths(engine.params, "w_tiles")
    monkeypatch.setenv(PACK_ENV, "0")
    unpacked, want = _engine_tokens(q)
    assert unpacked.params is q.params and tokens == want


@pytest.mark.skipif(bool(decode_build.cpu_missing()), reason="no float32 decode kernel here")
def test_a_float32_head_is_packed_as_panels_beside_its_weight(pair, monkeypatch):
    fp, _ = pair
    cfg = fp.config
    packed = engine_params(fp.params, cfg)
    (path,) = _paths(packed, "head_panels" if cfg.tie_word_embeddings else "w_panels")
    node = packed[path[0].key]
    table_DV = node["embedding_VD"].T if cfg.tie_word_embeddings else node["w"]
    np.testing.assert_array_equal(
        np.asarray(unpack_panels(node[path[-1].key], table_DV.shape[1])), np.asarray(table_DV)
    )
    np.testing.assert_allclose(_logits(packed, cfg), _logits(fp.params, cfg), rtol=1e-5, atol=1e-5)
    zeroed = {**packed, path[0].key: {**node, path[-1].key: jnp.zeros_like(node[path[-1].key])}}
    logits = _logits(zeroed, cfg)
    bias = np.asarray(fp.params["final_logits_bias_V"]) if cfg.final_logits_bias else 0.0
    np.testing.assert_allclose(
        logits, np.broadcast_to(bias, logits.shape), atol=1e-6
    )  # decode rows read the panels
    engine, tokens = _engine_tokens(fp)
    assert _paths(engine.params, path[-1].key)
    monkeypatch.setenv(PACK_ENV, "0")
    assert tokens == _engine_tokens(fp)[1]


def test_nothing_is_packed_where_no_kernel_reads_it(pair, monkeypatch):
    fp, q = pair
    monkeypatch.setenv(METHOD_ENV, "dynamic")  # int8 through XLA's dot
    assert engine_params(q.params, q.config) is q.params
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), fp.params)
    assert engine_params(bf16, fp.config) is bf16
    monkeypatch.setenv(PACK_ENV, "0")
    assert engine_params(fp.params, fp.config) is fp.params
