"""An engine's packed weights (encdec.models.packing): int8 projections as the kernel's tiles and
float32 decode projections as panels give the unpacked tree's logits, the engine decodes with
them, and nothing is packed where no kernel reads it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encdec
from encdec.engine import Engine, EngineConfig, Request
from encdec.models import decode, encode, init_dense_kv
from encdec.models.packing import DECODE_PROJECTIONS, PACK_ENV, engine_params
from encdec.models.quant import INPUT_DIMS, METHOD_ENV
from encdec.models.transformer import tied_head_owner
from pallas_kernels.decode_matmul import build as decode_build
from pallas_kernels.decode_matmul import unpack_panels
from pallas_kernels.int8_matmul import build as int8_build
from tests.tiny_models import save_hf_model

# T5 at initializer_factor 1 (see test_quant), tied BART, and T5 v1.1 (gated FFN; transformers 5
# saves its head tied: _untied gives it one of its own).
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


def _unpacked(node, name):
    """A packed projection's panels as its ``w``."""
    w = node["w"]
    K = int(np.prod(w.shape[: INPUT_DIMS[name]]))
    return unpack_panels(node["w_panels"], w.size // K).reshape(w.shape)


def _decoder_projections(params):
    for i, layer in enumerate(params["decoder"]["layers"]):
        for block, names in DECODE_PROJECTIONS.items():
            for name in names:
                if name in layer.get(block, {}):
                    yield (i, block, name), layer[block][name]


def _with_projections(params, fn):
    """``params`` with ``fn(key, node)`` for each decoder projection a decode step reads."""
    layers = [
        {
            **layer,
            **{
                block: {k: fn((i, block, k), v) if k in names else v for k, v in layer[block].items()}
                for block, names in DECODE_PROJECTIONS.items()
                if block in layer
            },
        }
        for i, layer in enumerate(params["decoder"]["layers"])
    ]
    return {**params, "decoder": {**params["decoder"], "layers": layers}}


def _untied(model):
    """The model with an untied head of its own (the tiny T5 v1.1 saves tied under transformers 5)."""
    owner = model.params[tied_head_owner(model.params)]
    w_DV = jnp.asarray(np.random.default_rng(3).standard_normal(owner["embedding_VD"].T.shape, np.float32))
    cfg = dataclasses.replace(model.config, tie_word_embeddings=False, tied_output_rescale=False)
    return dataclasses.replace(model, config=cfg, params={**model.params, "lm_head": {"w": w_DV}})


@pytest.mark.skipif(bool(decode_build.cpu_missing()), reason="no float32 decode kernel here")
@pytest.mark.parametrize("head", ["own", "untied"])
def test_float32_decode_projections_are_packed_as_panels(pair, head, monkeypatch):
    """Every projection a decode step reads gets panels beside its ``w``, a tied table beside the
    embedding. The logits are the unpacked tree's, decode rows read the panels, the engine's
    tokens are the unpacked engine's, and an engine of more than 16 slots packs nothing."""
    fp = pair[0] if head == "own" else _untied(pair[0])
    cfg = fp.config
    packed = engine_params(fp.params, cfg)
    assert packed["encoder"] is fp.params["encoder"]
    nodes = dict(_decoder_projections(packed))
    assert nodes.keys() == dict(_decoder_projections(fp.params)).keys()
    for (_, _, name), node in nodes.items():
        np.testing.assert_array_equal(_unpacked(node, name), node["w"])
    for layer in packed["decoder"]["layers"]:  # projected once per request, over many rows
        assert "w_panels" not in layer["cross_attn"]["k"] and "w_panels" not in layer["cross_attn"]["v"]
    if cfg.tie_word_embeddings:
        zero_key = tied_head_owner(packed)
        owner = packed[zero_key]
        table_DV = unpack_panels(owner["head_panels"], cfg.vocab_size)
        np.testing.assert_array_equal(table_DV, owner["embedding_VD"].T)
        zero_head = {**owner, "head_panels": jnp.zeros_like(owner["head_panels"])}
    else:
        zero_key, head_node = "lm_head", packed["lm_head"]
        np.testing.assert_array_equal(_unpacked(head_node, "lm_head"), head_node["w"])
        zero_head = {**head_node, "w_panels": jnp.zeros_like(head_node["w_panels"])}
    np.testing.assert_allclose(_logits(packed, cfg), _logits(fp.params, cfg), rtol=1e-5, atol=1e-5)
    bias = np.asarray(fp.params["final_logits_bias_V"]) if cfg.final_logits_bias else 0.0
    logits = _logits({**packed, zero_key: zero_head}, cfg)
    np.testing.assert_allclose(logits, np.broadcast_to(bias, logits.shape), atol=1e-6)  # the head's panels
    # Zeroed panels read as zeroed weights: decode rows read the panels, not the ``w`` beside them.
    zero_panels = _with_projections(packed, lambda _, n: {**n, "w_panels": jnp.zeros_like(n["w_panels"])})
    zero_w = _with_projections(fp.params, lambda _, n: {**n, "w": jnp.zeros_like(n["w"])})
    np.testing.assert_allclose(_logits(zero_panels, cfg), _logits(zero_w, cfg), rtol=1e-5, atol=1e-5)
    engine, tokens = _engine_tokens(fp)
    assert all("w_panels" in n for _, n in _decoder_projections(engine.params))
    assert engine_params(fp.params, cfg, decode_rows=17) is fp.params
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
