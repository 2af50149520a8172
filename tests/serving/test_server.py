"""``encdec serve`` on a loopback port, called with the official ``openai`` client (and raw
HTTP where the client hides the wire): completions, streaming, stop strings, adapters by
``model``, metrics, and every error case."""

import dataclasses
import json
import re
import time

import httpx
import openai
import pytest

import encdec
from encdec.engine import Request
from encdec.lora import LoraConfig, merge_adapter, save_peft
from encdec.serving import ServerThread, build_app, serve_model
from tests.engine.test_engine_lora import _adapter
from tests.serving.conftest import MAX_NEW, text_config, text_engine

KEY = "test-key"
PROMPTS = ["t5 t17 t300", "t9 t8", "t100 t7 t8 t9 t10 t11", "t400 t3 t44"]


@pytest.fixture(scope="module")
def lora(text_model):
    return _adapter(text_model, 3, 2, ("q", "v"))


@pytest.fixture(scope="module")
def server(text_model, lora, tmp_path_factory):
    adapter_dir = save_peft(
        tmp_path_factory.mktemp("adapter"),
        lora,
        text_model.config,
        lora_config=LoraConfig(rank=2, target_modules=("q", "v")),
    )
    served = serve_model(
        text_model, name="tiny-t5", config=text_config(), adapters={"my-adapter": adapter_dir}, warmup=False
    )
    with ServerThread(build_app(served, api_key=KEY)) as http:
        yield http, served
    served.engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _text(model, token_ids):
    return model.tokenizer.decode(token_ids, skip_special_tokens=True)


def _wait_idle(served, seconds=30):
    """Until the engine holds nothing (a request cancelled by its handler is let go by the
    engine's thread a round later)."""
    deadline = time.monotonic() + seconds
    while True:
        snapshot, s = served.engine.snapshot(), served.engine.stats()
        if not (snapshot.pending or snapshot.busy_slots or s.tracked_requests):
            break
        assert time.monotonic() < deadline, (snapshot, s)
        time.sleep(0.01)
    assert (s.tracked_requests, s.self_pages_used, s.cross_pages_used) == (0, 0, 0)


def test_completion_equals_reference_and_engine(client, text_model):
    for prompt in PROMPTS:
        got = client.completions.create(model="tiny-t5", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        ids = text_model.tokenizer(prompt)["input_ids"]
        ref = encdec.reference_generate(text_model, [ids], MAX_NEW, pad_to_multiple=16)[0]
        assert got.choices[0].text == _text(text_model, ref.token_ids)
        assert got.choices[0].finish_reason == ("stop" if ref.token_ids[-1] == 1 else "length")
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(ref.token_ids)
        assert got.object == "text_completion" and got.model == "tiny-t5" and got.id.startswith("cmpl-")
    # Sampling depends only on the seed: equal to the engine's own generate (an engine of the
    # same shapes as the server's, so the compiled steps are shared).
    engine = text_engine(text_model)
    sampled = [Request(p, max_new_tokens=12, temperature=0.9, top_p=0.8, seed=7) for p in PROMPTS]
    for req, out in zip(sampled, engine.generate(sampled), strict=True):
        got = client.completions.create(
            model="tiny-t5", prompt=req.inputs, max_tokens=12, temperature=0.9, top_p=0.8, seed=7
        )
        assert got.choices[0].text == out.text
    # Token-id prompts, and several prompts in one request (one choice each, in order).
    batch = client.completions.create(
        model="tiny-t5", prompt=[[5, 17, 300, 1], [9, 8, 1]], max_tokens=8, temperature=0
    )
    singles = [
        client.completions.create(model="tiny-t5", prompt=p, max_tokens=8, temperature=0) for p in PROMPTS[:2]
    ]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]


def _streamed(client, **kw):
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, reasons, logprobs = {}, {}, {}
    for ch in chunks[:-1]:
        (choice,) = ch.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.logprobs is not None:
            lp = logprobs.setdefault(choice.index, {"tokens": [], "token_logprobs": [], "text_offset": []})
            for key in lp:
                lp[key] += getattr(choice.logprobs, key)
        if choice.finish_reason is not None:
            assert choice.index not in reasons  # one finishing chunk per choice
            reasons[choice.index] = choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    if logprobs:
        return texts, reasons, chunks[-1].usage, len(chunks), logprobs
    return texts, reasons, chunks[-1].usage, len(chunks)


@pytest.mark.parametrize("temperature", [0.0, 1.1])
def test_streamed_text_equals_non_streamed(client, temperature):
    kw = dict(model="tiny-t5", prompt=PROMPTS, max_tokens=MAX_NEW, temperature=temperature, seed=3)
    whole = client.completions.create(**kw)
    texts, reasons, usage, n_chunks = _streamed(client, **kw)
    assert [texts[c.index] for c in whole.choices] == [c.text for c in whole.choices]
    assert [reasons[c.index] for c in whole.choices] == [c.finish_reason for c in whole.choices]
    assert usage == whole.usage
    assert n_chunks > len(PROMPTS) + 1  # really streamed in pieces


def test_sse_wire_format_ends_with_done(server):
    http, _ = server
    body = {"model": "tiny-t5", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", http.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_end_the_text_before_them(client, text_model):
    """Text prompts stop in the engine, token-id prompts in the server: the same text."""
    full = client.completions.create(model="tiny-t5", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0)
    words = full.choices[0].text.split()
    stop = " " + words[3]  # its first occurrence ends the text
    cut = full.choices[0].text[: full.choices[0].text.index(stop)]
    ids = text_model.tokenizer(PROMPTS[0])["input_ids"]
    for prompt, stops in ((PROMPTS[0], stop), (PROMPTS[0], [stop, "never-there"]), (ids, stop)):
        got = client.completions.create(
            model="tiny-t5", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stop=stops
        )
        assert (got.choices[0].text, got.choices[0].finish_reason) == (cut, "stop")
        assert got.usage.completion_tokens < full.usage.completion_tokens  # stopped there, not at the end
        texts, reasons, _, _ = _streamed(
            client, model="tiny-t5", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stop=stops
        )
        assert (texts[0], reasons[0]) == (cut, "stop")


def test_n_samples_and_best_of_beams_equal_the_engine(client, text_model):
    engine = text_engine(text_model)
    prompt = PROMPTS[2]
    cases = [  # (API arguments, the engine request they mean, how many choices come back)
        (
            dict(n=3, temperature=0.9, seed=5),
            Request(prompt, max_new_tokens=12, temperature=0.9, seed=5, num_return_sequences=3),
            3,
        ),
        (
            dict(n=2, best_of=3, temperature=0),
            Request(prompt, max_new_tokens=12, num_beams=3, num_return_sequences=2),
            2,
        ),
        (
            dict(n=2, temperature=0),
            Request(prompt, max_new_tokens=12, num_beams=2, num_return_sequences=2),
            2,
        ),
    ]
    for args, request, count in cases:
        want = engine.generate([request])[0].sequences
        got = client.completions.create(model="tiny-t5", prompt=prompt, max_tokens=12, **args)
        assert [c.index for c in got.choices] == list(range(count))
        assert [c.text for c in got.choices] == [q.text for q in want]
        assert len({c.text for c in got.choices}) == count  # distinct samples, distinct beams
        assert got.usage.completion_tokens == sum(len(q.token_ids) for q in want)
        texts, reasons, usage, _ = _streamed(
            client, model="tiny-t5", prompt=[prompt, prompt], max_tokens=12, **args
        )
        assert [texts[i] for i in range(2 * count)] == [c.text for c in got.choices] * 2
        assert [reasons[i] for i in range(count)] == [c.finish_reason for c in got.choices]
    # best_of > n when sampling: the n samples of best mean log-probability.
    samples = engine.generate(
        [Request(prompt, max_new_tokens=12, temperature=1.2, seed=9, num_return_sequences=4, logprobs=0)]
    )
    ranked = sorted(samples[0].sequences, key=lambda q: -q.cumulative_logprob / len(q.token_ids))
    got = client.completions.create(
        model="tiny-t5", prompt=prompt, max_tokens=12, temperature=1.2, seed=9, n=2, best_of=4
    )
    assert [c.text for c in got.choices] == [q.text for q in ranked[:2]]


def test_logprobs_streamed_and_whole(client, text_model):
    engine = text_engine(text_model)
    want = engine.generate([Request(PROMPTS[0], max_new_tokens=MAX_NEW, logprobs=2)])[0]
    got = client.completions.create(
        model="tiny-t5", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0, logprobs=2
    )
    lp = got.choices[0].logprobs
    assert lp.tokens == text_model.tokenizer.convert_ids_to_tokens(want.token_ids)
    assert lp.token_logprobs == pytest.approx(want.logprobs)
    tokens = text_model.tokenizer.convert_ids_to_tokens
    assert lp.top_logprobs == [{tokens(k): v for k, v in d.items()} for d in want.top_logprobs]
    assert all(lp.tokens[i] in lp.top_logprobs[i] for i in range(len(lp.tokens)))  # greedy: the top one
    text = got.choices[0].text
    assert (
        lp.text_offset[0] == 0
        and lp.text_offset == sorted(lp.text_offset)
        and lp.text_offset[-1] < len(text) + 1
    )
    *_, streamed = _streamed(
        client, model="tiny-t5", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0, logprobs=2
    )
    assert streamed[0]["tokens"] == lp.tokens and streamed[0]["text_offset"] == lp.text_offset
    assert streamed[0]["token_logprobs"] == pytest.approx(lp.token_logprobs)


def test_model_selects_the_adapter(client, text_model, lora):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny-t5", "my-adapter"} and cards["my-adapter"].parent == "tiny-t5"
    merged = dataclasses.replace(text_model, params=merge_adapter(text_model.params, lora))
    differs = 0
    for prompt in PROMPTS:
        ids = [text_model.tokenizer(prompt)["input_ids"]]
        got = client.completions.create(model="my-adapter", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        assert got.choices[0].text == _text(
            text_model, encdec.reference_generate(merged, ids, MAX_NEW, pad_to_multiple=16)[0].token_ids
        )
        base = client.completions.create(model="tiny-t5", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        differs += got.choices[0].text != base.choices[0].text
    assert differs >= 2


@pytest.mark.parametrize(
    "kw, param, message",
    [
        (dict(model="nope"), "model", "the model 'nope' does not exist"),
        (dict(temperature=-1.0), "temperature", "temperature must be in"),
        (dict(max_tokens=MAX_NEW + 1), "max_tokens", f"max_tokens must be in \\[1, {MAX_NEW}\\]"),
        (dict(extra_body={"max_tokens": 2.5}), "max_tokens", "valid integer"),
        (dict(extra_body={"temperature": True}), "temperature", "valid number"),
        (dict(seed=2**40), "seed", "seed must be in"),
        (dict(top_p=0.0), "top_p", "top_p must be in"),
        (dict(extra_body={"min_tokens": 5}, max_tokens=3), "min_tokens", "min_tokens must be in"),
        (dict(extra_body={"colour": "red"}), "colour", "not a known parameter"),
        (dict(prompt=[1, "a"]), "prompt", "prompt: must be a string"),
        (dict(prompt=[]), "prompt", "must not be an empty list"),
        (dict(prompt=[[5, 100000]]), None, "outside the vocabulary"),
        (dict(n=0), "n", "n must be in"),
        (dict(n=2, best_of=1), "best_of", "best_of \\(1\\) must be at least n \\(2\\)"),
        (dict(n=2, temperature=0, best_of=99), "best_of", "best_of=99 exceeds"),
        (dict(logprobs=9), "logprobs", "logprobs must be at most 5"),
        (dict(stream=True, n=1, best_of=2, temperature=1.0), "best_of", "cannot be streamed"),
        (dict(echo=True), "echo", "echo is not supported"),
        (dict(stop=""), "stop", "must not be empty"),
    ],
)
def test_bad_requests_get_named_errors(client, server, kw, param, message):
    args = dict(model="tiny-t5", prompt="t5 t6", max_tokens=4) | kw
    error = openai.NotFoundError if param == "model" else openai.BadRequestError
    with pytest.raises(error, match=message) as e:
        client.completions.create(**args)
    assert e.value.body["param"] == param and e.value.body["type"] in (
        "invalid_request_error",
        "not_found_error",
    )
    _wait_idle(server[1])


@pytest.mark.parametrize(
    "content, headers, param, message",
    [
        (b"not json", {}, None, r"the body is not valid JSON \(Expecting value, at character 0\)"),
        (b'{"model": "tiny-t5"', {}, None, "the body is not valid JSON"),
        (b"[1, 2]", {}, None, "the body must be a JSON object, got an array"),
        (b"null", {}, None, "the body must be a JSON object, got null"),
        (b'{"model": "tiny-t5", "prompt": "t5"}', {"content-type": "text/plain"}, None, "Content-Type: app"),
        (b"", {}, None, "the request has no body"),
        # JSON escapes a lone surrogate (the official client cannot send one: it encodes to UTF-8)
        (
            b'{"model": "tiny-t5", "prompt": "t5 \\ud800"}', {}, "prompt",
            "prompt is not valid Unicode: a lone surrogate '.ud800' at character 3",
        ),
        (b'{"model": "tiny-t5", "prompt": "t5", "stop": ["t9", "\\udfff"]}', {}, "stop", r"stop\[1\] is not"),
        (b'{"model": "tiny-t5", "prompt": ["t5", "t6 \\ud800"]}', {}, "prompt", r"prompt\[1\] is not valid"),
    ],
)
def test_a_body_the_client_would_not_send_gets_a_named_error(server, content, headers, param, message):
    http, served = server
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"} | headers
    r = httpx.post(http.url + "/v1/completions", content=content, headers=headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert re.search(message, error["message"]) and error["param"] == param, error
    _wait_idle(served)


def test_api_key_is_required_on_v1_only(server):
    http, _ = server
    for key in ("wrong", "", KEY + "x"):
        bad = openai.OpenAI(base_url=http.url + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
            bad.completions.create(model="tiny-t5", prompt="t5", max_tokens=2)
    r = httpx.post(http.url + "/v1/completions", json={"model": "tiny-t5", "prompt": "t5"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(http.url + "/health").json() == {"status": "ok"}
    r = httpx.get(http.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def _slow(served, seconds=0.02):
    """Rounds of at least ``seconds`` (requests then last long enough to leave mid-way)."""
    engine = served.engine.engine
    real = engine.step

    def step():
        time.sleep(seconds)
        return real()

    engine.step = step
    return lambda: setattr(engine, "step", real)


def test_a_client_that_disconnects_has_its_request_cancelled(server):
    http, served = server
    restore = _slow(served)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny-t5", "prompt": "t5 t6", "max_tokens": MAX_NEW, "temperature": 0}
    try:
        cancelled = served.engine.snapshot().finished.get("cancelled", 0)
        with httpx.Client(timeout=30) as c:  # mid-stream: read one event, then hang up
            with c.stream(
                "POST", http.url + "/v1/completions", json=body | {"stream": True}, headers=headers
            ) as r:
                next(r.iter_lines())
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
            httpx.post(http.url + "/v1/completions", json=body, headers=headers, timeout=0.1)
        deadline = time.monotonic() + 30
        while served.engine.snapshot().finished.get("cancelled", 0) < cancelled + 2:
            assert time.monotonic() < deadline, served.engine.snapshot()
            time.sleep(0.01)
        _wait_idle(served)
    finally:
        restore()


def test_a_full_engine_answers_429(server, client):
    _, served = server
    restore = _slow(served)
    limit, served.engine.max_pending = served.engine.max_pending, 1
    try:
        stream = client.completions.create(
            model="tiny-t5", prompt="t5", max_tokens=MAX_NEW, temperature=0, stream=True
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError, match="max_pending=1"):
            client.completions.create(model="tiny-t5", prompt="t5", max_tokens=2)
        stream.close()
        _wait_idle(served)
    finally:
        served.engine.max_pending = limit
        restore()


def test_metrics_report_the_engine(server, client):
    http, served = server
    client.completions.create(model="tiny-t5", prompt="t5 t6", max_tokens=5, temperature=0)
    _wait_idle(served)
    text = httpx.get(http.url + "/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    s = served.engine.snapshot()
    assert values["encdec_generated_tokens_total"] == s.tokens_generated > 0
    assert values["encdec_queue_depth"] == 0 and values["encdec_busy_slots"] == 0
    assert (
        values['encdec_kv_pages_in_use{pool="self"}'] == values['encdec_kv_pages_in_use{pool="cross"}'] == 0
    )
    assert values['encdec_kv_pages{pool="self"}'] == s.self_pages_total > 0
    assert values["encdec_request_latency_seconds_count"] == s.finished.get("stop", 0) + s.finished.get(
        "length", 0
    )
    assert (
        values["encdec_time_to_first_token_seconds_count"] >= values["encdec_request_latency_seconds_count"]
    )
    assert values['encdec_requests_finished_total{finish_reason="length"}'] == s.finished["length"]


def test_a_stopped_engine_answers_503(text_model):
    served = serve_model(text_model, name="tiny-t5", config=text_config(), warmup=False)
    with ServerThread(build_app(served)) as http:
        served.engine.shutdown()
        c = openai.OpenAI(base_url=http.url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="shut down") as e:
            c.completions.create(model="tiny-t5", prompt="t5", max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(http.url + "/health").status_code == 503
