"""Paged decode attention: kernel vs reference vs a dense numpy loop vs Hugging Face's T5 bias.

``PagedAttentionTest`` runs the Pallas kernel on a GPU (skipped without one);
``PagedAttentionInterpretTest`` runs the same cases in interpret mode on CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config, UMT5Config
from transformers.models.t5.modeling_t5 import T5Attention
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from pallas_kernels.paged_attention import PagedAttentionBlock, paged_attention
from pallas_kernels.paged_attention.api import default_block
from pallas_kernels.paged_attention.reference import relative_bias_BNK

TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=1e-5, rtol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _hf_bucket(relative, *, num_buckets, max_distance):
    """Hugging Face's decoder bucketing: an implementation independent of ``t5_bias``."""
    out = T5Attention._relative_position_bucket(
        torch.as_tensor(np.asarray(relative), dtype=torch.long),
        bidirectional=False,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    return out.numpy()


@dataclasses.dataclass(frozen=True)
class Case:
    """One batch of slots; ``garbage`` fills every pool row that no valid key uses."""

    dtype: type = jnp.float32
    N: int = 2
    H: int = 16
    G: int = 8
    M: int = 5
    lengths: tuple[int, ...] = (0, 1, 8, 40)
    bias: bool = True
    scale: float = 0.25
    max_distance: int = 20
    num_buckets: int = 10
    block: PagedAttentionBlock | None = None
    garbage: str = "large"


def make_inputs(case: Case, seed: int = 0):
    """Shuffled page ids, random valid ids past each slot's last page, garbage elsewhere."""
    rng = np.random.default_rng(seed)
    B, N, H, G, M = len(case.lengths), case.N, case.H, case.G, case.M
    P = 1 + B * M + 3  # sentinel page 0, every slot's pages, a few spare pages
    ids = rng.permutation(np.arange(1, P))[: B * M].reshape(B, M)
    table = np.empty((B, M), np.int32)
    valid_rows = np.zeros((P, G), bool)
    for b, length in enumerate(case.lengths):
        used = -(-length // G)
        table[b, :used] = ids[b, :used]
        table[b, used:] = rng.integers(0, P, size=M - used)
        for k in range(length):
            valid_rows[table[b, k // G], k % G] = True
    k_pool = rng.normal(size=(N, P, G, H)).astype(np.float32)
    v_pool = rng.normal(size=(N, P, G, H)).astype(np.float32)
    fill = np.nan if case.garbage == "nan" else 1e4
    k_pool[:, ~valid_rows] = fill
    v_pool[:, ~valid_rows] = -fill
    q = rng.normal(size=(B, N, H)).astype(np.float32)
    bias = rng.normal(size=(N, case.num_buckets)).astype(np.float32) if case.bias else None
    cast = lambda x: None if x is None else jnp.asarray(x, case.dtype)  # noqa: E731
    return (
        cast(q),
        cast(k_pool),
        cast(v_pool),
        jnp.asarray(table),
        jnp.asarray(case.lengths, jnp.int32),
        None if bias is None else jnp.asarray(bias),
    )


def naive_attention(case: Case, q, k_pool, v_pool, table, lengths, bias):
    """Dense float64 loop over slots and heads, reading only each slot's valid keys."""
    q, k_pool, v_pool = (np.asarray(x, np.float64) for x in (q, k_pool, v_pool))
    table, lengths = np.asarray(table), np.asarray(lengths)
    B, N, H = q.shape
    out = np.zeros((B, N, H))
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            continue
        pos = np.arange(L)
        pages, rows = table[b, pos // case.G], pos % case.G
        buckets = _hf_bucket(pos - (L - 1), num_buckets=case.num_buckets, max_distance=case.max_distance)
        for n in range(N):
            logits = case.scale * k_pool[n, pages, rows] @ q[b, n]
            if bias is not None:
                logits = logits + np.asarray(bias, np.float64)[n, buckets]
            p = np.exp(logits - logits.max())
            out[b, n] = (p / p.sum()) @ v_pool[n, pages, rows]
    return out


def run(case: Case, inputs, **kwargs):
    q, k_pool, v_pool, table, lengths, bias = inputs
    return paged_attention(
        q,
        k_pool,
        v_pool,
        table,
        lengths,
        scale=case.scale,
        bias_NR=bias,
        max_distance=case.max_distance,
        block=case.block,
        **kwargs,
    )


KERNEL_CASES = {
    "f32_page8_bias_table_not_multiple_of_block": Case(block=PagedAttentionBlock(2, num_splits=1)),
    "bf16_page16_nobias_noscale_splits3": Case(
        dtype=jnp.bfloat16,
        H=32,
        G=16,
        M=3,
        lengths=(17, 48, 0, 1),
        bias=False,
        scale=1.0,
        block=PagedAttentionBlock(1, num_splits=3),
    ),
    "f32_page32_head12_default_block": Case(G=32, H=12, N=3, M=3, lengths=(33, 96, 32, 0), scale=1.0),
    "bf16_page8_head64_splits2": Case(
        dtype=jnp.bfloat16,
        H=64,
        M=7,
        lengths=(9, 56, 1, 0),
        scale=0.125,
        block=PagedAttentionBlock(2, num_splits=2),
    ),
    "f32_nan_garbage_splits2": Case(
        M=4, lengths=(3, 0, 17, 32), garbage="nan", block=PagedAttentionBlock(1, num_splits=2)
    ),
    "f32_page16_last_split_past_table": Case(
        G=16, M=5, lengths=(80, 17, 16, 1), bias=False, block=PagedAttentionBlock(1, num_splits=4)
    ),
    "bf16_page32_bias_splits2": Case(
        dtype=jnp.bfloat16,
        G=32,
        M=3,
        lengths=(96, 33, 0, 31),
        scale=1.0,
        block=PagedAttentionBlock(1, num_splits=2),
    ),
}


class PagedAttentionTest:
    """The Pallas kernel against the XLA reference; on a GPU."""

    __test__ = True
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _device(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("needs a GPU: the Triton kernel only compiles there (see the InterpretTest)")

    def pallas(self, case: Case, inputs):
        return run(case, inputs, implementation="pallas", interpret=self.INTERPRET)

    @pytest.mark.parametrize("name", sorted(KERNEL_CASES))
    def test_matches_reference(self, name):
        case = KERNEL_CASES[name]
        inputs = make_inputs(case)
        out = self.pallas(case, inputs)
        expected = run(case, inputs, implementation="xla")
        assert out.dtype == case.dtype and out.shape == inputs[0].shape
        out32, expected32 = np.asarray(out, np.float32), np.asarray(expected, np.float32)
        assert np.all(np.isfinite(out32))
        np.testing.assert_allclose(out32, expected32, **TOLERANCES[jnp.dtype(case.dtype)])
        for b, length in enumerate(case.lengths):
            if length == 0:
                np.testing.assert_array_equal(out32[b], 0.0)

    def test_hugging_face_t5_bias(self):
        np.testing.assert_allclose(*hf_t5_outputs(self.pallas), rtol=1e-5, atol=1e-5)

    def test_hugging_face_umt5_bias_of_every_layer(self):
        """UMT5: each layer's own table, fused, over that layer of the stacked pools."""

        def attend(case, inputs, layer):
            return run(case, inputs, implementation="pallas", interpret=self.INTERPRET, layer=layer)

        for out, expected in hf_umt5_outputs(attend):
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("layer", [0, 2])
    def test_stacked_layer_pools_read_the_right_layer(self, layer):
        """``layer=`` on stacked ``[L, N, P, G, H]`` pools equals passing that layer's pool."""
        case = KERNEL_CASES["f32_page8_bias_table_not_multiple_of_block"]
        q, k_pool, v_pool, table, lengths, bias = make_inputs(case)
        others = [make_inputs(case, seed=s)[1:3] for s in (1, 2)]
        pools = others[:layer] + [(k_pool, v_pool)] + others[layer:]
        k_stack, v_stack = (jnp.stack([p[i] for p in pools]) for i in (0, 1))
        stacked = run(
            case,
            (q, k_stack, v_stack, table, lengths, bias),
            implementation="pallas",
            interpret=self.INTERPRET,
            layer=layer,
        )
        single = run(case, (q, k_pool, v_pool, table, lengths, bias), implementation="xla")
        np.testing.assert_allclose(
            np.asarray(stacked), np.asarray(single), **TOLERANCES[jnp.dtype(case.dtype)]
        )


class PagedAttentionInterpretTest(PagedAttentionTest):
    """The same cases in Pallas interpret mode, on CPU."""

    INTERPRET = True


def hf_t5_outputs(attend):
    """``attend`` on a T5 decoder's own bias table vs softmax(q.k + HF ``compute_bias``) v."""
    config = T5Config(
        d_model=24,
        d_kv=8,
        num_heads=3,
        relative_attention_num_buckets=12,
        relative_attention_max_distance=20,
        is_decoder=True,
    )
    torch.manual_seed(0)
    attention = T5Attention(config, has_relative_attention_bias=True).eval()
    bias_NR = attention.relative_attention_bias.weight.detach().numpy().T
    case = Case(
        N=3, H=8, G=8, M=6, lengths=(45, 1, 21, 8), bias=True, scale=1.0, max_distance=20, num_buckets=12
    )
    q, k_pool, v_pool, table, lengths, _ = make_inputs(case, seed=1)
    out = attend(case, (q, k_pool, v_pool, table, lengths, jnp.asarray(bias_NR)))
    expected = np.zeros(q.shape, np.float32)
    with torch.no_grad():
        for b, L in enumerate(case.lengths):
            pos = np.arange(L)
            pages, rows = np.asarray(table)[b, pos // case.G], pos % case.G
            k_NLH = torch.as_tensor(np.array(k_pool)[:, pages, rows])
            v_NLH = torch.as_tensor(np.array(v_pool)[:, pages, rows])
            bias_NL = attention.compute_bias(L, L)[0, :, -1, :]
            scores_NL = torch.einsum("NH,NLH->NL", torch.as_tensor(np.array(q[b])), k_NLH) + bias_NL
            expected[b] = torch.einsum("NL,NLH->NH", scores_NL.softmax(-1), v_NLH).numpy()
    return np.asarray(out), expected


def hf_umt5_outputs(attend, num_layers=3):
    """Per layer: ``attend`` with that layer's table and stacked pools vs softmax(q.k + HF UMT5's
    ``compute_bias`` of that layer) v. The tables differ, so a kernel reading layer 0's would fail."""
    config = UMT5Config(
        d_model=24,
        d_kv=8,
        num_heads=3,
        relative_attention_num_buckets=12,
        relative_attention_max_distance=20,
        is_decoder=True,
    )
    torch.manual_seed(0)
    layers = [UMT5Attention(config, has_relative_attention_bias=True).eval() for _ in range(num_layers)]
    case = Case(
        N=3, H=8, G=8, M=6, lengths=(45, 1, 21, 8), bias=True, scale=1.0, max_distance=20, num_buckets=12
    )
    q, _, _, table, lengths, _ = make_inputs(case, seed=1)
    pools = [make_inputs(case, seed=1 + i)[1:3] for i in range(num_layers)]
    k_stack, v_stack = (jnp.stack([p[j] for p in pools]) for j in (0, 1))
    results = []
    for i, attention in enumerate(layers):
        bias_NR = jnp.asarray(attention.relative_attention_bias.weight.detach().numpy().T)
        out = attend(case, (q, k_stack, v_stack, table, lengths, bias_NR), i)
        k_pool, v_pool = (np.asarray(x) for x in pools[i])
        expected = np.zeros(q.shape, np.float32)
        with torch.no_grad():
            for b, L in enumerate(case.lengths):
                pos = np.arange(L)
                pages, rows = np.asarray(table)[b, pos // case.G], pos % case.G
                k_NLH, v_NLH = (torch.as_tensor(x[:, pages, rows]) for x in (k_pool, v_pool))
                bias_NL = attention.compute_bias(1, L, past_seen_tokens=L - 1)[0, :, -1, :]
                scores_NL = torch.einsum("NH,NLH->NL", torch.as_tensor(np.array(q[b])), k_NLH) + bias_NL
                expected[b] = torch.einsum("NL,NLH->NH", scores_NL.softmax(-1), v_NLH).numpy()
        results.append((np.asarray(out), expected))
    return results


def test_reference_matches_hugging_face_umt5_bias_of_every_layer():
    for out, expected in hf_umt5_outputs(
        lambda case, inputs, layer: run(case, inputs, implementation="xla", layer=layer)
    ):
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_reference_matches_hugging_face_t5_bias():
    np.testing.assert_allclose(
        *hf_t5_outputs(lambda case, inputs: run(case, inputs, implementation="xla")), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (12, 20), (7, 9)])
def test_bias_equals_hugging_face_compute_bias(num_buckets, max_distance):
    """The bias row of the last query equals T5Attention.compute_bias, past max_distance too."""
    config = T5Config(
        d_model=16,
        d_kv=4,
        num_heads=4,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance,
        is_decoder=True,
    )
    torch.manual_seed(0)
    attention = T5Attention(config, has_relative_attention_bias=True)
    bias_NR = jnp.asarray(attention.relative_attention_bias.weight.detach().numpy().T)
    lengths = [1, 2, max_distance - 1, max_distance, max_distance + 1, 3 * max_distance + 5]
    K = max(lengths)
    bias_BNK = np.asarray(
        relative_bias_BNK(bias_NR, jnp.asarray(lengths, jnp.int32), K, max_distance=max_distance)
    )
    with torch.no_grad():
        for b, L in enumerate(lengths):
            expected_NL = attention.compute_bias(L, L)[0, :, -1, :].numpy()
            np.testing.assert_array_equal(bias_BNK[b, :, :L], expected_NL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("G", [8, 16, 32])
@pytest.mark.parametrize("bias,scale", [(True, 1.0), (False, 0.125), (True, 0.3)])
def test_reference_matches_naive(dtype, G, bias, scale):
    M = 3
    case = Case(dtype=dtype, G=G, M=M, H=12, lengths=(0, 1, G, G + 1, M * G), bias=bias, scale=scale)
    inputs = make_inputs(case)
    out = np.asarray(run(case, inputs, implementation="xla"), np.float32)
    expected = naive_attention(case, *inputs)
    np.testing.assert_allclose(out, expected, **TOLERANCES[jnp.dtype(dtype)])


def test_reference_ignores_nan_in_unused_rows():
    case = Case(garbage="nan", lengths=(0, 3, 9, 40))
    inputs = make_inputs(case)
    out = np.asarray(run(case, inputs, implementation="xla"))
    np.testing.assert_allclose(out, naive_attention(case, *inputs), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[0], 0.0)


@pytest.mark.parametrize(
    "case",
    [
        Case(dtype=jnp.bfloat16, H=64, G=16, M=9, block=PagedAttentionBlock(4, num_splits=2)),
        Case(H=12, N=3, G=32, M=3, lengths=(33, 96, 32, 0), bias=False),
    ],
)
def test_lowers_to_triton_ir(case):
    """Cross-lowering to Triton IR on CPU enforces the lowering's rules (power-of-two sizes)."""
    inputs = make_inputs(case)
    lowered = (
        jax.jit(lambda *a: run(case, a, implementation="pallas"))
        .trace(*inputs)
        .lower(lowering_platforms=("cuda",))
    )
    assert "triton" in lowered.as_text()


def test_auto_is_xla_on_cpu_and_rejects_unknown():
    case = Case()
    inputs = make_inputs(case)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(run(case, inputs), run(case, inputs, implementation="xla"))
    with pytest.raises(ValueError, match="implementation"):
        run(case, inputs, implementation="cuda")


def test_default_block_fills_the_gpu():
    few_long = default_block(B=2, N=12, H=64, M=64, G=16)
    many_short = default_block(B=256, N=16, H=64, M=8, G=16)
    assert few_long.pages_per_block * 16 == 128 and few_long.num_splits > 1
    assert many_short.num_splits == 1
    tiny = default_block(B=1, N=1, H=12, M=3, G=8)
    assert tiny.pages_per_block * 8 <= 32
