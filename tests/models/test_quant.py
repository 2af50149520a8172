"""int8 weights: the matmul against its float64 reference, the model against its dequantized
float twin, accuracy against float32 greedy output, and the errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encdec
from encdec.bench.metrics import position_agreement, teacher_forced_agreement
from encdec.engine import Engine, EngineConfig, Request
from encdec.lora.adapters import AdapterError, LoraConfig, init_lora, merge_adapter
from encdec.models import decode, encode, init_dense_kv
from encdec.models.layers import project
from encdec.models.quant import (
    METHOD_ENV,
    QuantizationError,
    dequantize_params,
    int8_matmul,
    int8_matmul_reference,
    quantize_array,
    quantize_params,
)
from pallas_kernels.int8_matmul.build import cpu_missing
from tests.tiny_models import save_hf_model

# The tiny T5 at HF's default init (initializer_factor 1): at 2 or 4 (the engine tests' choice,
# for varied outputs) it is chaotic (weights times 1 + 1e-3 noise move its logits by 0.6 and 4
# of their std), so no weight format could track its greedy choices. Tied BART as HF builds it.
CONFIGS = {"t5": {"initializer_factor": 1.0}, "bart": {}}
MAX_IN, MAX_NEW = 20, 12


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"quant_{request.param}")
    save_hf_model(request.param, d, config=CONFIGS[request.param])
    return encdec.load_pretrained(d), encdec.load_pretrained(d, quantize="int8")


def _requests(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 90, int(rng.integers(1, MAX_IN + 1))).tolist() for _ in range(n)]


@pytest.mark.parametrize("method", ["kernel", "dynamic", "weight_only"])
@pytest.mark.parametrize("layout", ["KN", "NK"])
@pytest.mark.parametrize("M", [0, 1, 8, 13])
def test_int8_matmul_matches_reference(method, layout, M):
    if method == "kernel" and cpu_missing():
        pytest.skip(f"this CPU lacks {', '.join(cpu_missing())}")
    rng = np.random.default_rng(M)
    K, N = 40, 24  # not multiples of anything in particular
    w = rng.standard_normal((K, N), np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    q, s = quantize_array(w, 1)
    x = rng.standard_normal((M, K), np.float32)
    if M:
        x[0] = 0.0  # an all-zero activation row
    ref = int8_matmul_reference(x, np.asarray(q), np.asarray(s), method)
    w_arg = q if layout == "KN" else q.T
    fn = lambda x, w: int8_matmul(x, w, s, method=method, w_layout=layout)  # noqa: E731
    for f in (fn, jax.jit(fn)):
        got = np.asarray(f(jnp.asarray(x), w_arg))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.sqrt(K))
    # The dequantized weight is within half a step of the float one, per channel.
    half_step = np.broadcast_to(np.asarray(s) * 0.5 + 1e-7, w.shape)
    np.testing.assert_array_less(np.abs(np.asarray(q) * np.asarray(s) - w), half_step)


def _logits(params, cfg, ids, toks):
    ids_BS = jnp.asarray([ids], jnp.int32)
    mask_BS = jnp.ones(ids_BS.shape, bool)
    enc = encode(params, cfg, ids_BS, mask_BS)
    T = len(toks)
    kv = init_dense_kv(params, cfg, enc, mask_BS, T)
    logits, _ = decode(params, cfg, jnp.asarray([toks], jnp.int32), jnp.arange(T, dtype=jnp.int32)[None], kv)
    return np.asarray(logits[0])


def test_weight_only_model_equals_its_dequantized_float_twin(pair, monkeypatch):
    """Every projection, cross K/V and the (tied or untied) head go through the int8 path: with
    activations kept float, the logits are those of the float model holding ``w * w_scale``."""
    fp, q = pair
    assert q.quantize == "int8"
    leaves = {jax.tree_util.keystr(k): x for k, x in jax.tree_util.tree_leaves_with_path(q.params)}
    weights = {k: x for k, x in leaves.items() if k.endswith("['w']") or k.endswith("['embedding_VD']")}
    assert any("cross_attn']['k" in k for k in weights) and all(x.dtype == jnp.int8 for x in weights.values())
    assert [k for k, x in leaves.items() if x.dtype == jnp.int8] == list(weights)
    monkeypatch.setenv(METHOD_ENV, "weight_only")
    cfg = fp.config
    ids, toks = _requests(1, 3)[0], [cfg.decoder_start_token_id, 5, 9, 17, 4]
    got = _logits(q.params, cfg, ids, toks)
    want = _logits(dequantize_params(q.params), cfg, ids, toks)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).std())


def test_the_kernel_and_xla_int8_paths_give_the_same_bits(pair, monkeypatch):
    """The CPU kernel (biases added as it stores, in every projection and BART's head) and XLA's
    dynamic int8 path give a model the same logits, bit for bit: one ulp apart in a layer flips
    the next layer's int8 roundings, and int8 models then decode differently."""
    if cpu_missing():
        pytest.skip(f"this CPU lacks {', '.join(cpu_missing())}")
    _, q = pair
    cfg = q.config
    ids, toks = _requests(1, 5)[0], [cfg.decoder_start_token_id, 7, 11, 3]
    got = {}
    for method in ("kernel", "dynamic"):
        monkeypatch.setenv(METHOD_ENV, method)
        got[method] = _logits(q.params, cfg, ids, toks)
    np.testing.assert_array_equal(got["kernel"], got["dynamic"])


def test_int8_greedy_agrees_with_float32(pair):
    """Figures (these tiny configs, 24 requests x 12 tokens): teacher-forced per-step agreement
    T5 0.997, BART 0.986 (free-running positions 0.958, 0.941). The engine's int8 output equals
    the int8 reference generator's: slots and pages do not change int8 results."""
    fp, q = pair
    inputs = _requests()
    ref = [g.token_ids for g in encdec.reference_generate(fp, inputs, MAX_NEW, min_new_tokens=MAX_NEW)]
    agreement = teacher_forced_agreement(q, inputs, ref)
    assert agreement >= 0.95, agreement
    cfg = EngineConfig(
        num_slots=8, page_size=4, max_encoder_len=MAX_IN, max_new_tokens=MAX_NEW, attention_impl="xla"
    )
    outs = Engine(q, cfg).generate(
        [Request(inputs=x, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW) for x in inputs]
    )
    q_ref = [g.token_ids for g in encdec.reference_generate(q, inputs, MAX_NEW, min_new_tokens=MAX_NEW)]
    assert [o.token_ids for o in outs] == q_ref
    print(
        f"{fp.config.model_type}: teacher-forced {agreement:.3f}, free-running "
        f"{position_agreement(q_ref, ref):.3f}"
    )


def test_an_int8_engine_reads_a_bfloat16_window(pair):
    """With int8 weights the CPU window decode attention reads holds bfloat16 bits (uint16)
    unless ``window_dtype="float32"``; a float32 model keeps float32. Rounding K and V flips
    a few of these chaotic tiny models' choices (free-running figures printed; the int8 bench's
    teacher-forced agreement with float32 is the same with either window)."""
    fp, q = pair
    inputs = _requests()
    cfg = EngineConfig(num_slots=8, page_size=4, max_encoder_len=MAX_IN, max_new_tokens=MAX_NEW)
    engines = {
        "int8": Engine(q, cfg),
        "int8, float32 window": Engine(q, dataclasses.replace(cfg, window_dtype="float32")),
        "float32": Engine(fp, cfg),
    }
    dtypes = {k: {x.dtype for x in jax.tree.leaves(e.state.window)} for k, e in engines.items()}
    assert dtypes == {
        "int8": {jnp.dtype(jnp.uint16)},
        "int8, float32 window": {jnp.dtype(jnp.float32)},
        "float32": {jnp.dtype(jnp.float32)},
    }
    reqs = [Request(inputs=x, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW) for x in inputs]
    got = {k: [o.token_ids for o in e.generate(reqs)] for k, e in engines.items()}
    ref = [g.token_ids for g in encdec.reference_generate(fp, inputs, MAX_NEW, min_new_tokens=MAX_NEW)]
    assert got["float32"] == ref
    q_ref = [g.token_ids for g in encdec.reference_generate(q, inputs, MAX_NEW, min_new_tokens=MAX_NEW)]
    assert got["int8, float32 window"] == q_ref
    window_vs_int8 = position_agreement(got["int8"], q_ref)
    int8_vs_float32 = position_agreement(q_ref, ref)
    print(f"{fp.config.model_type}: bfloat16 window vs int8 {window_vs_int8:.3f}, "
          f"int8 vs float32 {int8_vs_float32:.3f}")
    assert window_vs_int8 >= 0.85


def test_bad_input_is_refused(pair, tmp_path):
    fp, q = pair
    with pytest.raises(QuantizationError, match="already quantized"):
        encdec.quantize_model(q)
    with pytest.raises(QuantizationError, match="already int8"):
        quantize_params(q.params)
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int4'"):
        encdec.quantize_model(fp, "int4")
    with pytest.raises(QuantizationError, match="unknown quantization scheme"):
        encdec.load_pretrained(fp.path, quantize="fp4")
    again = encdec.quantize_model(fp)  # the float model is left as it was
    assert again.quantize == "int8" and fp.quantize is None
    assert all(x.dtype != jnp.int8 for x in jax.tree_util.tree_leaves(fp.params))


def test_lora_applies_on_top_of_int8_in_float(pair, monkeypatch):
    """An adapter on an int8 projection adds its float low-rank term: with weight-only int8 the
    result is the dequantized float projection's with the same adapter. Merging is refused."""
    fp, q = pair
    monkeypatch.setenv(METHOD_ENV, "weight_only")
    lora = init_lora(
        jax.random.PRNGKey(0), q.params, q.config, LoraConfig(rank=2, target_modules="all-linear")
    )
    site = lora["decoder"]["layers"][0]["attn"]["q"]
    site = {**site, "b": jax.random.normal(jax.random.PRNGKey(1), site["b"].shape)}  # b = 0 at init
    p_q = q.params["decoder"]["layers"][0]["attn"]["q"]
    p_f = dequantize_params(q.params)["decoder"]["layers"][0]["attn"]["q"]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 2, q.config.d_model))
    got = project(p_q, x, "BTD,DNH->BTNH", site)
    np.testing.assert_allclose(got, project(p_f, x, "BTD,DNH->BTNH", site), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got - project(p_q, x, "BTD,DNH->BTNH"))).max() > 1e-3
    with pytest.raises(AdapterError, match="int8 weights take adapters on top"):
        merge_adapter(q.params, lora)


def test_bfloat16_weights_equal_the_float_model_with_rounded_products(pair):
    """``quantize="bfloat16"``: every projection's weight and the embedding table in bfloat16 (the
    rest float32), and each product rounds its input to bfloat16 and sums in float32, which is
    the float32 model computing on those rounded weights and inputs. The engine's greedy output
    equals the reference generator's on the same weights, and stays close to float32's."""
    fp, _ = pair
    bf = encdec.load_pretrained(fp.path, quantize="bfloat16")
    leaves = {jax.tree_util.keystr(k): x for k, x in jax.tree_util.tree_leaves_with_path(bf.params)}
    weights = {k for k in leaves if k.endswith("['w']") or k.endswith("['embedding_VD']")}
    assert {k for k, x in leaves.items() if x.dtype == jnp.bfloat16} == weights
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 16)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 7)), jnp.bfloat16)
    want = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(w, np.float64)
    got = project({"w": w}, x, "BTD,DF->BTF")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    inputs = _requests()
    ref = [g.token_ids for g in encdec.reference_generate(fp, inputs, MAX_NEW, min_new_tokens=MAX_NEW)]
    assert teacher_forced_agreement(bf, inputs, ref) >= 0.95
    cfg = EngineConfig(num_slots=8, page_size=4, max_encoder_len=MAX_IN, max_new_tokens=MAX_NEW)
    outs = Engine(bf, cfg).generate(
        [Request(inputs=x, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW) for x in inputs]
    )
    bf_ref = [g.token_ids for g in encdec.reference_generate(bf, inputs, MAX_NEW, min_new_tokens=MAX_NEW)]
    assert [o.token_ids for o in outs] == bf_ref
