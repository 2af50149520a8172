"""Bad input hurts no one else: every defect class of the adversarial run, reproduced.

Each bad request is submitted while a batch is running and inside a ``generate`` call beside
good requests: it must fail alone with a :class:`RequestError` naming the field (an error
output carrying its handle in ``generate``), and the good requests must get their reference
outputs with every page returned.
"""

import math
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encdec.engine import Engine, EngineConfig, Request, RequestError, TextFrontEnd
from tests.engine.test_engine import MAX_IN, MAX_NEW, _config, _reference, _requests

BAD_REQUESTS = {
    # 1. passed validation, then broke step() for everyone
    "float max_new_tokens": ({"max_new_tokens": 4.0}, "max_new_tokens must be an integer"),
    "fractional max_new_tokens": ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    "seed past int32": ({"seed": 2**40}, "seed must be in"),
    "top_k past int32": ({"top_k": 2**40}, "top_k must be in"),
    "stop id past int32": ({"stop_token_ids": [2**40]}, r"stop_token_ids\[0\] must be in"),
    "float stop id": ({"stop_token_ids": [1.5]}, r"stop_token_ids\[0\] must be an integer"),
    "stop id outside the vocabulary": ({"stop_token_ids": [5000]}, "stop_token_ids has ids outside"),
    # 2. non-finite or underflowing floats
    "infinite temperature": ({"temperature": math.inf}, "temperature must be finite"),
    "temperature past float32": ({"temperature": 1e39}, "temperature overflows float32"),
    "top_p underflowing float32": ({"top_p": 1e-50}, "top_p underflows float32"),
    "nan top_p": ({"top_p": math.nan}, "top_p must be finite"),
    "nan arrival_time": ({"arrival_time": math.nan}, "arrival_time must be finite"),
    "negative arrival_time": ({"arrival_time": -1.0}, "arrival_time must be in"),
    # 3. inputs silently reinterpreted
    "float ids": ({"inputs": [5.7, 6.2]}, r"inputs\[0\] must be an integer"),
    "dict inputs": ({"inputs": {5: 1, 6: 2}}, "inputs must be text or token ids"),
    "set inputs": ({"inputs": {5, 6}}, "inputs must be text or token ids"),
    "float array inputs": ({"inputs": np.array([5.0, 6.0])}, "inputs must be a 1-D integer array"),
    # 4. TypeError / AttributeError instead of RequestError
    "string temperature": ({"temperature": "hot"}, "temperature must be a number"),
    "min_new_tokens None": ({"min_new_tokens": None}, "min_new_tokens must be an integer"),
    "stop_token_ids None": ({"stop_token_ids": None}, "stop_token_ids must be a list or tuple"),
    "stop_token_ids int": ({"stop_token_ids": 7}, "stop_token_ids must be a list or tuple"),
    "stop_token_ids string": ({"stop_token_ids": "ab"}, "stop_token_ids must be a list or tuple"),
    "string prefix": ({"decoder_prefix": ["a"]}, r"decoder_prefix\[0\] must be an integer"),
    "empty prefix": ({"decoder_prefix": []}, "decoder_prefix must hold at least 1"),
    "bool max_new_tokens": ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    "int adapter id": ({"adapter_id": 3}, "adapter_id must be a string"),
    # the decoding fields (beams, processors, log-probabilities, stop strings)
    "nan length_penalty": ({"length_penalty": math.nan}, "length_penalty must be finite"),
    "string repetition_penalty": ({"repetition_penalty": "2"}, "repetition_penalty must be a number"),
    "float num_beams": ({"num_beams": 2.0}, "num_beams must be an integer"),
    "suppress_tokens None": ({"suppress_tokens": None}, "suppress_tokens must be a list or tuple"),
    "early_stopping 1": ({"early_stopping": 1}, "early_stopping must be one of"),
    "negative logprobs": ({"logprobs": -1}, "logprobs must be in"),
    "stop int": ({"stop": 5}, "stop must be a string or a list of strings"),
    "stop with a lone surrogate": ({"stop": ["ab", "x\ud800"]}, r"stop\[1\] is not valid Unicode: a lone"),
    "forced bos outside the vocabulary": ({"forced_bos_token_id": 500}, "forced_bos_token_id has ids"),
    "watched token outside the vocabulary": (
        {"prompt_logprob_token_id": 500, "prompt_logprobs": 0},
        "prompt_logprob_token_id has ids outside",
    ),
    "watched token without prompt_logprobs": ({"prompt_logprob_token_id": 3}, "set prompt_logprobs too"),
    # a step with no token left: beam search kept no hypothesis and answered "length", no tokens
    "forced bos begin-suppressed": (
        {"forced_bos_token_id": 0, "begin_suppress_tokens": [0], "num_beams": 2},
        "forced_bos_token_id=0 is also in begin_suppress_tokens",
    ),
    "forced bos suppressed": ({"forced_bos_token_id": 9, "suppress_tokens": [3, 9]}, "=9 is also in supp"),
    "forced eos suppressed": ({"forced_eos_token_id": 1, "suppress_tokens": [1]}, "eos_token_id=1 is also"),
    "forced eos begin-suppressed at its one step": (
        {"forced_eos_token_id": 1, "begin_suppress_tokens": [1], "max_new_tokens": 1},
        "forced_eos_token_id=1 is also in begin_suppress_tokens",
    ),
}
"""name -> (Request fields over a good request's, the error it must raise)."""


def _good(n=4, seed=21):
    return _requests(n, seed)


def _check_good(model, requests, outputs):
    for req, out in zip(requests, outputs, strict=True):
        assert out.token_ids == _reference("t5", model, tuple(req.inputs), req.max_new_tokens), req


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models["t5"], _config(num_slots=4))


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_fails_alone(tiny_models, engine, name):
    fields, message = BAD_REQUESTS[name]
    model = tiny_models["t5"]
    good = _good()
    bad = Request(**{"inputs": [5, 6, 7], "max_new_tokens": 4, **fields})
    handles = [engine.submit(r) for r in good]
    engine.step()
    engine.step()  # a batch is running when the bad request arrives
    with pytest.raises(RequestError, match=message):
        engine.submit(bad)
    engine.run_until_idle()
    _check_good(model, good, [engine.result(h) for h in handles])
    outputs = engine.generate(good[:2] + [bad] + good[2:])
    assert outputs[2].finish_reason == "error" and outputs[2].error is not None
    assert outputs[2].request_id > max(handles)  # an error output carries its own handle
    _check_good(model, good, outputs[:2] + outputs[3:])
    stats = engine.stats()
    assert (stats.self_pages_used, stats.cross_pages_used, stats.tracked_requests) == (0, 0, 0)


@pytest.mark.parametrize("bad", [None, {"inputs": [5, 6]}, "5 6", [5, 6]])
def test_something_that_is_not_a_request_fails_alone(tiny_models, engine, bad):
    with pytest.raises(RequestError, match="a request must be an encdec Request"):
        engine.submit(bad)
    good = _good(2)
    outputs = engine.generate([good[0], bad, good[1]])
    assert outputs[1].finish_reason == "error"
    _check_good(tiny_models["t5"], good, [outputs[0], outputs[2]])


def test_seed_none_draws_a_seed(engine):
    outputs = engine.generate([Request(inputs=[5, 6, 7], max_new_tokens=8, temperature=1.0, seed=None)] * 4)
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    assert len({tuple(o.token_ids) for o in outputs}) > 1  # four fresh seeds, not one


def test_numpy_scalars_and_arrays_are_accepted(tiny_models, engine):
    req = Request(
        inputs=np.array([5, 9, 17], np.int64), max_new_tokens=np.int32(6), top_p=np.float32(1.0),
        seed=np.int64(3),
    )
    out = engine.generate([req])[0]
    assert out.token_ids == _reference("t5", tiny_models["t5"], (5, 9, 17), 6)


def test_warmup_refuses_to_run_over_live_requests(tiny_models):
    model = tiny_models["t5"]
    engine = Engine(model, _config(num_slots=2))
    good = _good(3)
    handles = [engine.submit(r) for r in good]
    engine.step()
    with pytest.raises(RuntimeError, match="warmup.. needs an idle engine: 3 request"):
        engine.warmup()
    engine.run_until_idle()
    _check_good(model, good, [engine.result(h) for h in handles])
    engine.warmup()  # idle now


def test_submit_from_many_threads_gives_unique_handles(tiny_models):
    model = tiny_models["t5"]
    engine = Engine(model, _config())
    good = _good(8, 22)
    handles: list[int] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as much as possible
    try:
        def submit_all():
            mine = [engine.submit(good[i % len(good)]) for i in range(100)]
            handles.extend(mine)

        threads = [threading.Thread(target=submit_all) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert len(handles) == 600 and len(set(handles)) == 600
    engine.run_until_idle()
    for h in handles[:40]:
        out = engine.result(h)
        assert out is not None and out.finish_reason in ("stop", "length")
    assert engine.stats().self_pages_used == 0


def test_generate_from_two_threads_at_once(tiny_models):
    model = tiny_models["t5"]
    engine = Engine(model, _config())
    batches = [_good(10, 23), _good(10, 24)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            results[i] = engine.generate(batches[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        _check_good(model, batches[i], results[i])
    assert engine.stats().tracked_requests == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_self_pages", 0),
        ("num_cross_pages", 0),
        ("num_self_pages", 1),  # the sentinel alone holds nothing
        ("max_stop_tokens", -1),
        ("num_slots", 2.5),
        ("num_slots", "8"),
        ("page_size", 0),
        ("steps_per_dispatch", True),
        ("cross_kv_fraction", 0.0),
        ("memory_budget_bytes", 0),
        ("encoder_buckets", (16, 0)),
        ("encoder_tokens_per_dispatch", 0),
        ("mode", "dynamic"),
        ("cache_dtype", "int4"),
        ("window_dtype", "float16"),
    ],
)
def test_config_values_are_checked_not_replaced(field, value):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
        EngineConfig(**{field: value})


def test_text_requests_without_max_new_tokens_get_the_default(tiny_models):
    model = tiny_models["t5"]
    engine = Engine(model, _config(max_new_tokens=5))  # below the default of 32
    out = engine.generate([Request(inputs=[5, 9, 17])])[0]
    assert out.finish_reason in ("stop", "length") and len(out.token_ids) <= 5
    assert out.token_ids == _reference("t5", model, (5, 9, 17), 5)


class _FlakyFrontEnd(TextFrontEnd):
    """Fails on inputs that start with 13 while preparing (a tokenizer that crashes) and on
    inputs that start with 14 while building the encoder batch."""

    def prepare(self, request, config):
        if list(request.inputs[:1]) == [13]:
            raise RuntimeError("the tokenizer crashed")
        return super().prepare(request, config)

    def encoder_batch(self, bucket, rows, inputs):
        if any(list(ids[:1]) == [14] for ids in inputs):
            raise RuntimeError("a bad row")
        return super().encoder_batch(bucket, rows, inputs)


def test_a_request_that_breaks_preparing_or_encoding_fails_alone(tiny_models):
    model = tiny_models["t5"]
    engine = Engine(model, _config(num_slots=4), frontend=_FlakyFrontEnd(model))
    good = _good(6, 25)
    crashes = Request(inputs=[13, 5, 6], max_new_tokens=4)
    breaks = Request(inputs=[14, 5, 6], max_new_tokens=4)
    outputs = engine.generate(good[:3] + [crashes, breaks] + good[3:])
    assert [o.finish_reason for o in outputs[3:5]] == ["error", "error"]
    assert "RuntimeError: the tokenizer crashed" in outputs[3].error
    assert "encoding failed: RuntimeError: a bad row" in outputs[4].error
    _check_good(model, good, outputs[:3] + outputs[5:])
    stats = engine.stats()
    assert (stats.self_pages_used, stats.cross_pages_used, stats.tracked_requests) == (0, 0, 0)


# --- fuzzing every field ------------------------------------------------------------------------

_GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-40, max_value=1e-40),
    st.text(max_size=3),
    st.lists(st.integers(-3, 2**33), max_size=4),
    st.lists(st.floats(allow_nan=True), max_size=2),
    st.dictionaries(st.integers(0, 9), st.integers(0, 9), max_size=2),
    st.just(np.int64(3)),
    st.just(np.float32(0.5)),
    st.just(np.array([4, 5])),
)


PLAUSIBLE = {
    "inputs": st.lists(st.integers(0, 95), min_size=1, max_size=MAX_IN),
    "max_new_tokens": st.integers(1, MAX_NEW) | st.none(),
    "min_new_tokens": st.integers(0, 3),
    "temperature": st.floats(0.0, 3.0),
    "top_k": st.integers(0, 120),
    "top_p": st.floats(1e-30, 1.0),
    "seed": st.integers(-(2**31), 2**31 - 1) | st.none(),
    "stop_token_ids": st.lists(st.integers(0, 95), max_size=4),
    "decoder_prefix": st.none() | st.lists(st.integers(0, 95), min_size=1, max_size=2),
    "arrival_time": st.none() | st.floats(0.0, 0.01),
    "num_beams": st.sampled_from([1, 1, 2, 3]),
    "length_penalty": st.floats(-2.0, 2.0),
    "early_stopping": st.sampled_from([False, True, "never"]),
    "num_return_sequences": st.sampled_from([1, 1, 2]),
    "repetition_penalty": st.sampled_from([1.0, 1.0, 0.7, 1.5]),
    "no_repeat_ngram_size": st.none() | st.integers(1, 4),
    "suppress_tokens": st.lists(st.integers(0, 95), max_size=3),
    "begin_suppress_tokens": st.lists(st.integers(0, 95), max_size=2),
    "forced_bos_token_id": st.none() | st.integers(0, 95),
    "logprobs": st.none() | st.integers(0, 5),
    "prompt_logprobs": st.none() | st.integers(0, 2),
    "prompt_logprobs_from": st.integers(0, 3),
    "prompt_logprob_token_id": st.none() | st.integers(0, 95),
}


@st.composite
def fuzz_fields(draw):
    """Plausible values for every field, with up to three of them replaced by garbage.

    ``arrival_time`` keeps plausible values: a valid one of 2**63 s would make ``generate`` wait
    that long, as asked (its invalid values are in ``BAD_REQUESTS``)."""
    fields = {name: draw(values) for name, values in PLAUSIBLE.items()}
    names = sorted(set(PLAUSIBLE) - {"arrival_time"})
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        fields[name] = draw(_GARBAGE)
    return fields


FUZZ_EXAMPLES = {"run": 0, "served": 0, "refused": 0}


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(fields=fuzz_fields())
def test_fuzzed_requests_succeed_or_fail_alone(tiny_models, fields):
    model = tiny_models["t5"]
    engine = _FUZZ_ENGINE.setdefault("engine", Engine(model, _config(num_slots=3, max_decoder_prefix=2)))
    good = Request(inputs=[7, 11, 13, 17], max_new_tokens=MAX_NEW)
    fuzzed = Request(**fields)
    outputs = engine.generate([good, fuzzed, good])
    FUZZ_EXAMPLES["run"] += 1
    for out in (outputs[0], outputs[2]):
        assert out.token_ids == _reference("t5", model, (7, 11, 13, 17), MAX_NEW)
    out = outputs[1]
    if out.finish_reason == "error":
        FUZZ_EXAMPLES["refused"] += 1
        with pytest.raises(RequestError):
            engine.submit(fuzzed)
    else:
        FUZZ_EXAMPLES["served"] += 1
        assert out.finish_reason in ("stop", "length")
        assert all(0 <= t < model.config.vocab_size for t in out.token_ids)
        assert 0 < len(out.token_ids) <= (fields["max_new_tokens"] or min(32, MAX_NEW))
        if fields["temperature"] == 0:  # greedy from the default prefix: the reference's tokens
            plain = fields["decoder_prefix"] is None and len(fields["stop_token_ids"]) == 0
            plain = plain and fields["min_new_tokens"] == 0 and fields["num_beams"] == 1
            plain = plain and fields["repetition_penalty"] == 1.0 and fields["no_repeat_ngram_size"] is None
            plain = plain and not fields["suppress_tokens"] and not fields["begin_suppress_tokens"]
            plain = plain and fields["forced_bos_token_id"] is None
            if plain:
                ids = tuple(int(t) for t in fields["inputs"])
                assert out.token_ids == _reference("t5", model, ids, len(out.token_ids))
    stats = engine.stats()
    assert (stats.self_pages_used, stats.cross_pages_used, stats.tracked_requests) == (0, 0, 0)


_FUZZ_ENGINE: dict = {}


def test_fuzz_ran_enough_examples():
    """Runs after the fuzz test (file order): it must have exercised both outcomes."""
    print(f"fuzz: {FUZZ_EXAMPLES}")
    assert FUZZ_EXAMPLES["run"] >= 250 and min(FUZZ_EXAMPLES["served"], FUZZ_EXAMPLES["refused"]) >= 20
