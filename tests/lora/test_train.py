"""Adapter training: a real learning signal, a frozen base, accumulation, and exact resume."""

import shutil

import jax
import numpy as np
import pytest

import encdec
from encdec.lora import LoraConfig
from encdec.lora.adapters import iter_adapters
from encdec.lora.checkpoint import AdapterCheckpointer
from encdec.lora.data import DataConfig, load_splits, train_batch
from encdec.lora.finetune import TinyT5Config, write_tiny_t5
from encdec.lora.train import TrainConfig, exact_match, fit, init_state, make_train_step
from tests.lora import strict_rank_promotion  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = write_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), TinyT5Config())
    return encdec.load_pretrained(directory)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One layer each side: cheaper to compile for the tests that check mechanics, not learning."""
    directory = write_tiny_t5(
        tmp_path_factory.mktemp("small_t5"), TinyT5Config(d_model=32, d_ff=64, num_layers=1)
    )
    return encdec.load_pretrained(directory)


# Adapter with dropout, two micro-batches per step.
MECHANICS = (
    LoraConfig(rank=4, dropout=0.1),
    TrainConfig(steps=8, batch_size=8, grad_accum=2, warmup_steps=2),
)


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.mark.slow
def test_adapter_learns_to_reverse_sequences(tiny):
    """Loss falls and held-out exact match climbs from 0 on a task the base model cannot do."""
    data = DataConfig(num_train=2048, num_eval=64, min_len=3, max_len=6, token_low=3, token_high=13)
    train, held = load_splits(data, tiny.config)
    assert not {tuple(s) for s, _ in train} & {tuple(s) for s, _ in held}
    base = _copy(tiny.params)
    result = fit(
        tiny,
        LoraConfig(rank=8, alpha=16),
        TrainConfig(steps=450, batch_size=32, learning_rate=3e-3),
        data,
        train,
        held,
    )
    first, last = result.history[0], result.history[-1]
    losses = [r["loss"] for r in result.history if "loss" in r]
    print(
        f"\nheld-out: loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}, "
        f"exact match {first['exact_match']:.3f} -> {last['exact_match']:.3f}; "
        f"train loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}"
    )
    assert first["exact_match"] < 0.05
    assert last["exact_match"] > 0.5
    assert last["eval_loss"] < 0.25 * first["eval_loss"]
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:10])
    # Only the adapter trained: the base parameters are bit-identical.
    for x, y in zip(jax.tree.leaves(tiny.params), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_only_adapter_weights_change_and_are_optimized(small):
    lc, tc = MECHANICS  # shares its compilation with the resume test
    data = DataConfig(num_train=64, num_eval=4)
    train, _ = load_splits(data, small.config)
    state = init_state(small.params, small.config, lc, tc)
    before_base, before_weights = _copy(small.params), _copy(state.weights)
    n_adapter = sum(x.size for x in jax.tree.leaves(state.weights))
    # Adam keeps two moments per adapter weight and nothing for the base model.
    n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    assert 2 * n_adapter <= n_opt <= 2 * n_adapter + 8
    step = make_train_step(small.config, lc, tc)
    for s in range(3):
        state, metrics = step(state, small.params, train_batch(train, small.config, data, s, 8, 2))
        assert np.isfinite(float(metrics["loss"]))
    for x, y in zip(jax.tree.leaves(small.params), jax.tree.leaves(before_base), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    changed = [
        np.abs(np.asarray(x) - y).max() > 0
        for x, y in zip(jax.tree.leaves(state.weights), jax.tree.leaves(before_weights), strict=True)
    ]
    assert all(changed)
    assert all(float(ad["scale"]) == lc.scale for _, ad in iter_adapters(state.lora()))


def test_gradient_accumulation_equals_one_big_batch(small):
    """Two micro-batches of 4 give the update of one batch of 8 (every label token weighs the same)."""
    data = DataConfig(num_train=64, num_eval=4, min_len=2, max_len=6)
    train, _ = load_splits(data, small.config)
    lc = LoraConfig(rank=4)
    out = []
    for bs, accum in ((8, 1), (4, 2)):
        tc = TrainConfig(steps=2, batch_size=bs, grad_accum=accum, warmup_steps=0, optimizer="sgd")
        state = init_state(small.params, small.config, lc, tc)
        step = make_train_step(small.config, lc, tc)
        # Two steps: the first has b = 0, so only the second moves a.
        for s in range(2):
            state, metrics = step(state, small.params, train_batch(train, small.config, data, s, bs, accum))
        out.append((float(metrics["loss"]), _copy(state.weights)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for x, y in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4)


def test_interrupted_run_resumes_with_the_same_loss_curve(small, tmp_path):
    data = DataConfig(num_train=96, num_eval=4)
    train, _ = load_splits(data, small.config)
    lc, tc = MECHANICS  # with dropout: the RNG must resume too
    full = fit(small, lc, tc, data, train)

    with AdapterCheckpointer(tmp_path / "ckpt", every=3) as ckpt:
        part = fit(small, lc, tc, data, train, checkpointer=ckpt, stop_after=5)
        assert part.stopped_early and int(part.state.step) == 5
        assert ckpt.latest_step() == 5
    # A crash after step 5 would lose it: resume from the periodic checkpoint at step 3.
    shutil.rmtree(tmp_path / "ckpt" / "5")
    with AdapterCheckpointer(tmp_path / "ckpt", every=3) as ckpt:
        assert ckpt.latest_step() == 3
        resumed = fit(small, lc, tc, data, train, checkpointer=ckpt)
        assert ckpt.latest_step() == 8
    assert [r["step"] for r in resumed.history] == list(range(1, 9))
    np.testing.assert_array_equal([r["loss"] for r in resumed.history], [r["loss"] for r in full.history])
    for x, y in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exact_match_is_the_same_with_the_adapter_merged(tiny):
    import dataclasses

    from encdec.lora import init_lora, merge_adapter
    from tests.lora import randomize_b

    data = DataConfig(num_train=8, num_eval=16)
    _, held = load_splits(data, tiny.config)
    lora = randomize_b(
        init_lora(jax.random.PRNGKey(0), tiny.params, tiny.config, LoraConfig(rank=2)), tiny.params
    )
    merged = dataclasses.replace(tiny, params=merge_adapter(tiny.params, lora))
    perfect = [(s, list(reversed(s[:-1])) + [s[-1]]) for s, _ in held]
    assert exact_match(tiny, lora, perfect) == exact_match(merged, None, perfect)
    from encdec.generate import reference_generate

    outs = reference_generate(tiny, [s for s, _ in held], 8)
    assert exact_match(tiny, None, [(s, o.token_ids) for (s, _), o in zip(held, outs, strict=True)]) == 1.0
