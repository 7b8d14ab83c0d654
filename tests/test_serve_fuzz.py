"""Property tests: whatever a client sends to the generation endpoints, the server answers below 500, and
every 4xx carries OpenAI's error shape. Random JSON values of every type go into every field (mixed with
plausible values, so that valid requests reach the engine too), and random bytes go in as bodies."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def api(tiny_run):
    from lmforge.serve import create_app

    # a low max_tokens limit keeps every accepted request short
    app = create_app(tiny_run.final, model_name="tiny", max_tokens_limit=8, max_batch=8, device="cpu",
                     precision="fp32")
    with TestClient(app) as client:
        yield client


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)


class field:
    """A field's valid values, those plus edge cases around them, and those plus any JSON at all."""

    def __init__(self, valid, *edges):
        self.valid = valid
        self.plausible = st.one_of(valid, *edges)
        self.any = st.one_of(self.plausible, json_values)


def body(fields: dict, required: tuple = ()):
    """Bodies of valid fields (these reach the engine), of edge cases, of anything; and any JSON."""
    def make(kind):
        return st.fixed_dictionaries({k: getattr(fields[k], kind) for k in required},
                                     optional={k: getattr(v, kind) for k, v in fields.items() if k not in required})
    return make("valid") | make("plausible") | make("any") | json_values


text = st.text(max_size=12)
SAMPLING = {
    "model": field(st.just("tiny"), st.sampled_from(["other", ""])),
    "max_tokens": field(st.integers(1, 8), st.integers(-2, 100)),
    "temperature": field(st.floats(0, 2), st.floats(-1, 3), st.just(0)),
    "top_p": field(st.floats(0, 1), st.floats(-0.5, 1.5)),
    "top_k": field(st.integers(0, 600), st.integers(-2, 10 ** 6)),
    "n": field(st.integers(1, 3), st.integers(-1, 70)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
                            st.fixed_dictionaries({}, optional={"include_usage": json_values})),
    "stop": field(st.text(min_size=1, max_size=4) | st.lists(st.text(max_size=3), max_size=4),
                  st.lists(st.text(max_size=3), max_size=6)),
    "seed": field(st.integers(-(2 ** 65), 2 ** 65)),
    "presence_penalty": field(st.floats(-2, 2), st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-2, 2), st.floats(-3, 3)),
    "logit_bias": field(st.dictionaries(st.integers(0, 300).map(str), st.floats(-100, 100), max_size=3),
                        st.dictionaries(st.integers(-5, 600).map(str) | text, st.floats(-150, 150) | st.floats(),
                                        max_size=3)),
    "user": field(text),
    "ignore_eos": field(st.booleans()),
}
COMPLETION = {
    **SAMPLING,
    "prompt": field(st.text(max_size=40) | st.lists(st.text(max_size=8), min_size=1, max_size=3)
                    | st.lists(st.integers(0, 300), min_size=1, max_size=5)
                    | st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=3), min_size=1, max_size=3),
                    st.lists(st.integers(-3, 600), max_size=5), st.lists(st.lists(st.integers(-3, 600), max_size=3),
                                                                         max_size=3)),
    "echo": field(st.booleans()),
    "logprobs": field(st.none(), st.integers(0, 3)),
    "best_of": field(st.just(1), st.integers(0, 3)),
    "suffix": field(st.none() | st.just(""), text),
}
part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
odd_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | json_values,
                                  "text": text | json_values})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer"])},
    optional={"content": text | st.lists(part, max_size=2), "name": st.text(max_size=4)})
odd_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", ""]) | json_values},
    optional={"content": text | st.lists(odd_part, max_size=2) | json_values, "name": text | json_values})
CHAT = {
    **SAMPLING,
    "messages": field(st.lists(message, min_size=1, max_size=3), st.lists(odd_message, max_size=3)),
    "max_completion_tokens": field(st.integers(1, 8), st.integers(-1, 100)),
    "logprobs": field(st.just(False), st.booleans()),
    "response_format": field(st.just({"type": "text"}), st.fixed_dictionaries({"type": st.sampled_from(
        ["text", "json_object"])})),
    "tools": field(st.just([]), st.lists(json_values, max_size=2)),
}


def check(resp, body=None) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], body)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert err["type"] == "invalid_request_error"
        assert "param" in err and "code" in err
        return
    assert resp.status_code == 200
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = resp.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], resp.text[-300:]
        for e in events[:-2]:
            assert e.startswith("data: ")
            payload = json.loads(e[len("data: "):])
            assert "error" not in payload, payload
    else:
        out = resp.json()
        assert out["choices"] and set(out["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])


def post(api, path: str, body):
    data = json.dumps(body, allow_nan=True)  # NaN / Infinity literals too: Python's parser accepts them
    return api.post(path, content=data, headers={"Content-Type": "application/json"})


@SETTINGS
@given(body=body(COMPLETION))
def test_completions_never_500(api, body):
    check(post(api, "/v1/completions", body), body)


@SETTINGS
@given(body=body(CHAT, required=("messages",)))
def test_chat_completions_never_500(api, body):
    check(post(api, "/v1/chat/completions", body), body)


@SETTINGS
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_non_json_bodies_are_4xx(api, raw, content_type, path):
    headers = {"Content-Type": content_type} if content_type else {}
    resp = api.post(path, content=raw, headers=headers)
    assert resp.status_code < 500, (resp.status_code, resp.text[:300], raw)
    if resp.status_code >= 400:
        assert resp.json()["error"]["type"] == "invalid_request_error"


def test_engine_survived(api):
    """After all the fuzzing the engine is idle and still answers."""
    h = api.get("/health").json()
    assert h["engine"]["active"] == 0 and h["engine"]["errors"] == 0
    r = api.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3})
    assert r.status_code == 200
