"""Many LoRA adapters in one engine run: each request equals the reference with its adapter merged."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import encdec
from encdec.engine import Engine, Request, RequestError
from encdec.lora import AdapterBank, LoraConfig, init_lora, merge_adapter
from tests.engine.test_engine import MAX_NEW, _config, _requests


def _adapter(model, seed, rank, targets):
    """A random adapter with nonzero B (a fresh one would change nothing and prove nothing)."""
    lora = init_lora(
        jax.random.PRNGKey(seed), model.params, model.config, LoraConfig(rank=rank, target_modules=targets)
    )
    key = jax.random.PRNGKey(seed + 100)

    def fill(x):
        nonlocal key
        key, sub = jax.random.split(key)
        return jax.random.normal(sub, x.shape) * 0.5 if x.ndim >= 2 else x

    return jax.tree.map(fill, lora)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_mixed_adapters_equal_reference_with_merged_weights(tiny_models, family):
    model = tiny_models[family]
    targets = ("q", "k", "v", "o", "wi", "wo") if family == "t5" else ("q_proj", "v_proj", "out_proj", "fc1")
    adapters = {"a": _adapter(model, 1, 4, targets), "b": _adapter(model, 2, 2, targets)}
    bank = AdapterBank(model.params, model.config, capacity=3, max_rank=4, target_modules=targets)
    engine = Engine(model, _config(), adapters=bank)
    engine.load_adapter("a", adapters["a"])
    warm = engine.warmup()
    engine.load_adapter("b", adapters["b"])  # loaded after compiling: must not recompile
    requests = [
        dataclasses.replace(r, adapter_id=[None, "a", "b"][i % 3]) for i, r in enumerate(_requests(18, 12))
    ]
    outputs = engine.generate(requests)
    assert engine.compile_counts() == warm
    merged = {None: model}
    for name, lora in adapters.items():
        merged[name] = dataclasses.replace(model, params=merge_adapter(model.params, lora))

    def reference(m, req):  # greedy for MAX_NEW, cut: one compile per padded length, not per budget
        out = encdec.reference_generate(m, [req.inputs], MAX_NEW, pad_to_multiple=8)[0]
        return out.token_ids[: req.max_new_tokens]

    differs = 0
    for req, out in zip(requests, outputs, strict=True):
        expected = reference(merged[req.adapter_id], req)
        assert out.token_ids == expected, req
        if req.adapter_id is not None and not differs:
            differs += reference(model, req) != expected
    assert differs > 0  # the adapters really change the outputs


def test_adapter_errors_and_unload_in_use(tiny_models):
    model = tiny_models["t5"]
    bank = AdapterBank(model.params, model.config, capacity=1, max_rank=2, target_modules=("q", "v"))
    engine = Engine(model, _config(), adapters=bank)
    with pytest.raises(RequestError, match="unknown adapter id 'x'"):
        engine.submit(Request(inputs=[5, 6], max_new_tokens=4, adapter_id="x"))
    with pytest.raises(ValueError, match="rank 4"):
        engine.load_adapter("big", _adapter(model, 3, 4, ("q", "v")))
    engine.load_adapter("small", _adapter(model, 4, 2, ("q", "v")))
    handle = engine.submit(Request(inputs=[5, 6], max_new_tokens=MAX_NEW, adapter_id="small"))
    with pytest.raises(ValueError, match="in use"):
        engine.unload_adapter("small")
    engine.run_until_idle()
    assert engine.result(handle).finish_reason in ("stop", "length")
    engine.unload_adapter("small")
    # An adapter for another base model (shapes one wider): refused with a clear error.
    wrong = jax.tree.map(
        lambda x: jnp.zeros(x.shape[:-1] + (x.shape[-1] + 1,)) if x.ndim >= 2 else x,
        _adapter(model, 5, 2, ("q", "v")),
    )
    with pytest.raises(ValueError, match=r"the base weight \(32, 4, 12\) needs"):
        engine.load_adapter("wrong-shape", wrong)
