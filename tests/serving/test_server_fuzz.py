"""Random request bodies (120 a run) against ``encdec serve``: plausible values of every completion field,
with some replaced by any JSON. Each gets a completion or an OpenAI-style 4xx naming the
problem, never a 500, and the engine is idle after each."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.test_server import KEY, _wait_idle, lora, server  # noqa: F401 (fixtures)

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=4)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=5,
)
_IDS = st.lists(st.integers(-2, 600), max_size=4)
_TEXT = st.text(max_size=3) | st.builds(str.__add__, st.text(max_size=2), st.characters(categories=["Cs"]))
"""Text, some of it ending in a lone surrogate (JSON can escape one: ``"\\ud800"``)."""
PLAUSIBLE = {
    "model": st.sampled_from(["tiny-t5", "my-adapter", "nope"]),
    "prompt": st.sampled_from(["t5 t6", "", "t9 t8 t7", "é中"]) | _TEXT | _IDS | st.lists(_IDS, max_size=2)
    | st.lists(st.sampled_from(["t5", "", "t7 t8"]) | _TEXT, max_size=3),
    "max_tokens": st.none() | st.integers(-1, 20),
    "temperature": st.none() | st.floats(0, 3),
    "top_p": st.none() | st.floats(0, 1),
    "seed": st.none() | st.integers(-(2**33), 2**33),
    "stop": st.none() | _TEXT | st.lists(_TEXT, max_size=3),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.none() | st.integers(0, 4),
    "best_of": st.none() | st.integers(0, 5),
    "logprobs": st.none() | st.integers(-1, 6),
    "echo": st.none() | st.booleans(),
    "suffix": st.none() | st.text(max_size=2),
    "frequency_penalty": st.none() | st.floats(-2, 2),
    "presence_penalty": st.none() | st.floats(-2, 2),
    "logit_bias": st.none() | st.dictionaries(st.text(max_size=3), st.integers(-100, 100), max_size=2),
    "user": st.none() | st.text(max_size=3),
    "top_k": st.none() | st.integers(-1, 700),
    "min_tokens": st.none() | st.integers(-1, 20),
    "stop_token_ids": st.none() | _IDS,
    "repetition_penalty": st.none() | st.floats(-1, 3),
    "no_repeat_ngram_size": st.none() | st.integers(-1, 5),
}
SEEN = {"served": 0, "refused": 0}


@st.composite
def bodies(draw):
    """Some fields at plausible values, up to two (or an unknown one) at any JSON value."""
    names = draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), unique=True, max_size=8))
    body = {"model": "tiny-t5", "prompt": "t5 t6"} | {name: draw(PLAUSIBLE[name]) for name in names}
    for name in draw(st.lists(st.sampled_from([*sorted(PLAUSIBLE), "colour"]), max_size=2, unique=True)):
        body[name] = draw(ANY_JSON)
    return body


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=bodies())
def test_any_body_gets_a_completion_or_a_named_error(server, body):  # noqa: F811
    http, served = server
    headers = {"Authorization": f"Bearer {KEY}"}
    content = json.dumps(body)  # ASCII, escapes and all: a lone surrogate travels as "\\ud800"
    headers = headers | {"Content-Type": "application/json"}
    r = httpx.post(http.url + "/v1/completions", content=content, headers=headers, timeout=60)
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300], body)
    if r.status_code != 200:
        SEEN["refused"] += 1
        error = r.json()["error"]
        assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error"), error
    elif body.get("stream"):
        SEEN["served"] += 1
        assert r.text.rstrip().endswith("data: [DONE]"), (r.text[-300:], body)
    else:
        SEEN["served"] += 1
        choices = r.json()["choices"]
        assert choices and all(c["finish_reason"] in ("stop", "length") for c in choices), choices
    _wait_idle(served)


def test_the_fuzz_served_and_refused():
    """Runs after the fuzz test (file order): both outcomes were exercised."""
    if not any(SEEN.values()):
        pytest.skip("the fuzz test did not run in this session")
    assert min(SEEN.values()) >= 12, SEEN
