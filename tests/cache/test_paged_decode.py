"""Greedy decoding through PagedKV equals decoding through DenseKV, token for token.

Tiny random Hugging Face models (T5 with non-default buckets, BART) are saved and loaded with
``encdec.load_pretrained``; pages come from a ``PageAllocator`` in shuffled order, several per
row. Slots start at different steps and one slot stays inactive with a stale page table, so
the run also checks that slots never affect each other and masked writes go nowhere.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encdec
from encdec.cache import SENTINEL_PAGE, PageAllocator, PagedKV, PoolConfig, init_pools, pages_for, write_cross
from encdec.cache.window_kv import WINDOW_ATTENTION_ENV, WindowKV, init_window
from encdec.models import decode, encode, init_dense_kv, project_cross_kv
from pallas_kernels.window_attention import kernel_available as window_kernel_available
from pallas_kernels.window_attention.build import TARGET as WINDOW_TARGET
from tests.cache.test_pools import full_size_values
from tests.tiny_models import VOCAB, save_hf_model

LENGTHS = [7, 3, 11]  # encoder lengths of the three real rows
STARTS = [0, 0, 5]  # the decode step at which each row joins (in-flight batching)
STEPS = 24  # tokens decoded per row: past T5's max_distance (20) of the tiny models
PAGE_SIZE = {"t5": 4, "bart": 8, "umt5": 4}
FAMILIES = ("t5", "bart")  # every test; UMT5 (a bias table per layer) in the kernel test only


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, directory)
    return encdec.load_pretrained(directory, tokenizer=False)


def _encoder_batch(cfg):
    rng = np.random.default_rng(1)
    ids = np.full((len(LENGTHS), max(LENGTHS)), cfg.pad_token_id, np.int32)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = rng.integers(3, VOCAB - 2, n)
    mask = np.arange(ids.shape[1])[None, :] < np.asarray(LENGTHS)[:, None]
    return jnp.asarray(ids), jnp.asarray(mask)


def _dense_greedy(model, enc_BSD, mask_BS):
    """Every row decodes positions 0 .. STEPS-1 together: the reference."""
    params, cfg = model.params, model.config

    @jax.jit
    def step(kv, tok_B, pos):
        logits, kv = decode(params, cfg, tok_B[:, None], jnp.full((tok_B.shape[0], 1), pos, jnp.int32), kv)
        return logits[:, 0], kv

    kv = init_dense_kv(params, cfg, enc_BSD, mask_BS, STEPS)
    tok = jnp.full((enc_BSD.shape[0],), cfg.decoder_start_token_id, jnp.int32)
    all_logits = []
    for pos in range(STEPS):
        logits, kv = step(kv, tok, pos)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        all_logits.append(np.asarray(logits))
    logits_BTV = np.stack(all_logits, 1)
    return logits_BTV, logits_BTV.argmax(-1)


def _paged_setup(model, enc_BSD, implementation, interpret):
    """Pools and a PagedKV for 4 slots: the 3 rows, plus slot 3 inactive over row 0's pages."""
    cfg = model.config
    G = PAGE_SIZE[cfg.model_type]
    rng = np.random.default_rng(7)
    B = len(LENGTHS) + 1
    M_self, M_cross = pages_for(STEPS, G), pages_for(max(LENGTHS), G)
    need_self, need_cross = len(LENGTHS) * M_self, sum(pages_for(n, G) for n in LENGTHS)
    self_alloc, cross_alloc = PageAllocator(need_self + 5), PageAllocator(need_cross + 3)
    pc = PoolConfig.from_pages(
        cfg, page_size=G, num_self_pages=self_alloc.num_pages, num_cross_pages=cross_alloc.num_pages
    )
    self_pages = rng.permutation(self_alloc.allocate(need_self))
    cross_pages = list(rng.permutation(cross_alloc.allocate(need_cross)))
    self_table = np.zeros((B, M_self), np.int32)
    cross_table = np.zeros((B, M_cross), np.int32)
    for r, n in enumerate(LENGTHS):
        self_table[r] = self_pages[r * M_self : (r + 1) * M_self]
        k = pages_for(n, G)
        cross_table[r, :k] = cross_pages[:k]
        del cross_pages[:k]
    self_table[3], cross_table[3] = self_table[0], cross_table[0]  # stale tables of a freed slot
    assert len({*self_table[:3].ravel()}) == self_table[:3].size

    cross_k, cross_v = project_cross_kv(model.params, cfg, enc_BSD)
    pad = ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0))  # the empty slot's row
    enc_lengths = jnp.asarray(LENGTHS + [0], jnp.int32)
    pools = jax.jit(write_cross, donate_argnums=0)(
        init_pools(pc), jnp.pad(cross_k, pad), jnp.pad(cross_v, pad), jnp.asarray(cross_table), enc_lengths
    )
    return PagedKV(
        pools=pools,
        self_page_table_BM=jnp.asarray(self_table),
        self_lengths_B=jnp.zeros((B,), jnp.int32),
        cross_page_table_BM=jnp.asarray(cross_table),
        cross_lengths_B=enc_lengths,
        active_B=jnp.zeros((B,), bool),
        implementation=implementation,
        interpret=interpret,
    )


def _make_step(model):
    params, cfg = model.params, model.config

    def step(kv, tok_B):
        logits, kv = decode(params, cfg, tok_B[:, None], kv.self_lengths_B[:, None], kv)
        return logits[:, 0], kv

    return jax.jit(step, donate_argnums=0)


def _check_step(logits, t, active, dense_logits, dense_tokens, done, start):
    """Active rows' logits and greedy tokens at step ``t`` equal the dense run's; the next tokens."""
    logits = np.asarray(logits)
    new_tok = logits.argmax(-1).astype(np.int32)
    for r in np.flatnonzero(active[: len(LENGTHS)]):
        i = t - STARTS[r]
        err = f"row {r} step {i}"
        np.testing.assert_allclose(logits[r], dense_logits[r, i], atol=1e-4, rtol=0, err_msg=err)
        assert new_tok[r] == dense_tokens[r, i], err
        done[r] += 1
    return np.where(active, new_tok, start)


@pytest.mark.parametrize(
    "implementation, interpret", [("xla", False), pytest.param("pallas", True, id="pallas-interpret")]
)
def test_paged_greedy_equals_dense_greedy(model, implementation, interpret):
    _check_paged_greedy(model, implementation, interpret)


def test_umt5_per_layer_bias_through_the_pallas_kernel(tmp_path):
    """UMT5 adds a different relative-bias table in every decoder layer; the kernel's fused-bias
    path (interpret mode here) must read each layer's, over that layer of the stacked pools."""
    save_hf_model("umt5", tmp_path)
    model = encdec.load_pretrained(tmp_path, tokenizer=False)
    tables = [np.asarray(layer["rel_bias_NR"]) for layer in model.params["decoder"]["layers"]]
    assert len(tables) == 3 and not np.allclose(tables[0], tables[1])
    _check_paged_greedy(model, "pallas", True)


def _check_paged_greedy(model, implementation, interpret):
    cfg = model.config
    ids, mask = _encoder_batch(cfg)
    enc = encode(model.params, cfg, ids, mask)
    dense_logits, dense_tokens = _dense_greedy(model, enc, mask)

    kv = _paged_setup(model, enc, implementation, interpret)
    step = _make_step(model)
    B = kv.active_B.shape[0]
    start = cfg.decoder_start_token_id
    tok = np.full((B,), start, np.int32)
    done = np.zeros(len(LENGTHS), int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a donated pool that could not be reused fails here
        for t in range(max(STARTS) + STEPS):
            active = np.array([STARTS[r] <= t < STARTS[r] + STEPS for r in range(len(LENGTHS))] + [False])
            old_pools = kv.pools
            logits, kv = step(kv.replace(active_B=jnp.asarray(active)), jnp.asarray(tok))
            assert old_pools.self_k_LNPGH.is_deleted() and old_pools.cross_v_LNPGH.is_deleted()
            tok = _check_step(logits, t, active, dense_logits, dense_tokens, done, start)
            np.testing.assert_array_equal(np.asarray(kv.self_lengths_B), [*done, 0])
    assert list(done) == [STEPS] * len(LENGTHS)
    for pool in (
        kv.pools.self_k_LNPGH,
        kv.pools.self_v_LNPGH,
        kv.pools.cross_k_LNPGH,
        kv.pools.cross_v_LNPGH,
    ):
        assert not np.asarray(pool[:, :, SENTINEL_PAGE]).any(), "a masked write reached the sentinel page"


def test_decode_step_updates_pools_in_place(model):
    """The jitted step, PagedKV donated, writes K/V into the pools without copying them."""
    cfg = model.config
    ids, mask = _encoder_batch(cfg)
    kv = _paged_setup(model, encode(model.params, cfg, ids, mask), "xla", False)
    kv = kv.replace(active_B=jnp.asarray([True, True, True, False]))
    hlo = _make_step(model).lower(kv, jnp.zeros((4,), jnp.int32)).compile().as_text()
    for pool in (kv.pools.self_k_LNPGH, kv.pools.cross_k_LNPGH):
        copies = full_size_values(hlo, pool.shape)
        assert not copies, f"the decode step copies a pool: {copies}"
    assert "input_output_alias" in hlo


def test_paged_kv_rejects_more_than_one_token(model):
    cfg = model.config
    ids, mask = _encoder_batch(cfg)
    kv = _paged_setup(model, encode(model.params, cfg, ids, mask), "xla", False)
    tokens = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="one token per step"):
        decode(model.params, cfg, tokens, jnp.zeros((4, 2), jnp.int32), kv)


@pytest.mark.parametrize("path", ["auto", "xla"])
def test_window_greedy_equals_dense_greedy_over_nan_stale_rows(model, path, monkeypatch):
    """``WindowKV`` over a persistent :class:`SlotWindow`: slots start at different steps.

    Every window row holds NaN before its slot starts, as an earlier occupant could leave them:
    starting a slot must clear its self rows and overwrite its cross rows whole, so nothing stale
    reaches the logits. The window never re-reads the pools, and at the end the pools hold what
    the window holds (they stay the store of record). Both attention paths: ``auto`` is the
    window attention CPU kernel where the CPU has AVX-512, ``xla`` XLA's per-slot loop.
    """
    monkeypatch.setenv(WINDOW_ATTENTION_ENV, path)
    cfg = model.config
    ids, mask = _encoder_batch(cfg)
    enc = encode(model.params, cfg, ids, mask)
    dense_logits, dense_tokens = _dense_greedy(model, enc, mask)
    kv = _paged_setup(model, enc, "xla", False)
    B = kv.active_B.shape[0]
    G = PAGE_SIZE[cfg.model_type]
    M_self, M_cross = kv.self_page_table_BM.shape[1], kv.cross_page_table_BM.shape[1]
    window = init_window(kv.pools, B, M_self, M_cross)
    window = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), window)
    cross_k, cross_v = project_cross_kv(model.params, cfg, enc)
    params = model.params

    @jax.jit
    def start(window, rows_X, k, v):
        return window.start_self_rows(rows_X).write_cross_rows(rows_X, k, v)

    @jax.jit
    def step(wkv, tok_B):
        logits, wkv = decode(params, cfg, tok_B[:, None], wkv.self_lengths_B[:, None], wkv)
        return logits[:, 0], wkv

    wkv = WindowKV(
        pools=kv.pools, window=window, self_page_table_BM=kv.self_page_table_BM,
        self_lengths_B=kv.self_lengths_B, cross_lengths_B=kv.cross_lengths_B, active_B=kv.active_B,
    )
    hlo = step.lower(wkv, jnp.zeros((B,), jnp.int32)).as_text()
    assert (window_kernel_available() and path == "auto") == (WINDOW_TARGET in hlo)
    start_token = cfg.decoder_start_token_id
    tok = np.full((B,), start_token, np.int32)
    done = np.zeros(len(LENGTHS), int)
    for t in range(max(STARTS) + STEPS):
        starting = [r for r in range(len(LENGTHS)) if STARTS[r] == t]
        if starting:  # the engine's start: the encoder output of exactly these rows
            rows = jnp.asarray(starting, jnp.int32)
            wkv = wkv.replace(window=start(wkv.window, rows, cross_k[:, rows], cross_v[:, rows]))
        active = np.array([STARTS[r] <= t < STARTS[r] + STEPS for r in range(len(LENGTHS))] + [False])
        logits, wkv = step(wkv.replace(active_B=jnp.asarray(active)), jnp.asarray(tok))
        tok = _check_step(logits, t, active, dense_logits, dense_tokens, done, start_token)
    assert list(done) == [STEPS] * len(LENGTHS)
    assert not np.asarray(wkv.pools.self_k_LNPGH[:, :, SENTINEL_PAGE]).any()
    for layer in range(cfg.decoder_layers):
        for r in range(len(LENGTHS)):
            pages = np.asarray(kv.self_page_table_BM[r])
            pool_NMGH = np.asarray(wkv.pools.self_v_LNPGH[layer][:, pages])
            pool_NKH = pool_NMGH.reshape(-1, M_self * G, cfg.head_dim)
            window_NKH = np.asarray(wkv.window.self_v_BNKH[layer][r])
            np.testing.assert_array_equal(pool_NKH[:, :STEPS], window_NKH[:, :STEPS])
    unused = np.asarray(wkv.window.self_k_BNKH[0][B - 1])
    assert np.isnan(unused).all(), "a slot that never started was written"



@pytest.mark.parametrize("path", ["auto", "xla"])
def test_a_bfloat16_window_holds_the_pools_rows_rounded(model, path, monkeypatch):
    """``window_dtype="bfloat16"``: the window keeps bfloat16 bits (in uint16, which XLA:CPU
    scatters in place), the pools keep float32; attention reads the rounded rows (kernel or
    XLA), so the logits stay within bfloat16's rounding of the dense run's."""
    monkeypatch.setenv(WINDOW_ATTENTION_ENV, path)
    cfg = model.config
    ids, mask = _encoder_batch(cfg)
    enc = encode(model.params, cfg, ids, mask)
    dense_logits, _ = _dense_greedy(model, enc, mask)
    kv = _paged_setup(model, enc, "xla", False)
    B = kv.active_B.shape[0]
    M_self, M_cross = kv.self_page_table_BM.shape[1], kv.cross_page_table_BM.shape[1]
    window = init_window(kv.pools, B, M_self, M_cross, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(window)} == {jnp.dtype(jnp.uint16)}
    assert kv.pools.self_k_LNPGH.dtype == jnp.float32
    cross_k, cross_v = project_cross_kv(model.params, cfg, enc)
    rows = jnp.arange(len(LENGTHS), dtype=jnp.int32)
    window = window.start_self_rows(rows).write_cross_rows(rows, cross_k, cross_v)
    params = model.params

    @jax.jit
    def step(wkv, tok_B):
        logits, wkv = decode(params, cfg, tok_B[:, None], wkv.self_lengths_B[:, None], wkv)
        return logits[:, 0], wkv

    wkv = WindowKV(
        pools=kv.pools, window=window, self_page_table_BM=kv.self_page_table_BM,
        self_lengths_B=kv.self_lengths_B, cross_lengths_B=kv.cross_lengths_B,
        active_B=jnp.asarray([True] * len(LENGTHS) + [False]),
    )
    hlo = step.lower(wkv, jnp.zeros((B,), jnp.int32)).as_text()
    assert (window_kernel_available() and path == "auto") == ("encdec_window_attention_bf16" in hlo)
    tok = np.full((B,), cfg.decoder_start_token_id, np.int32)
    worst = 0.0
    for t in range(8):
        logits, wkv = step(wkv, jnp.asarray(tok))
        logits = np.asarray(logits)
        worst = max(worst, float(np.abs(logits[: len(LENGTHS)] - dense_logits[:, t]).max()))
        tok[: len(LENGTHS)] = np.asarray(dense_logits[:, t]).argmax(-1)  # teacher-forced: no cascade
    assert 0 < worst < 0.05, worst  # rounded (not float32), and only by bfloat16's rounding
    pages = np.asarray(kv.self_page_table_BM[0])
    pool_NKH = np.asarray(wkv.pools.self_k_LNPGH[0][:, pages]).reshape(cfg.decoder_heads, -1, cfg.head_dim)
    bits_NKH = wkv.window.self_k_BNKH[0][0]
    window_NKH = np.asarray(jax.lax.bitcast_convert_type(bits_NKH, jnp.bfloat16), np.float32)
    rounded = np.asarray(jnp.asarray(pool_NKH[:, :8], jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(window_NKH[:, :8], rounded)
