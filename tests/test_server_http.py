"""The HTTP surface of the Foresight API, raw, on a mock engine: every error, the stream
format, disconnects and the event loop. (tests/test_server.py runs the real engine.)"""

import asyncio
import json
import threading
import time
import warnings

import httpx
import pytest
from starlette.testclient import TestClient

from foresight_lab.server import create_app, serve
from tests.mock_engine import MockEngine, expected_text

KEY = "sk-mock"
MODEL = "mock-model"
HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": HI}
COMPLETION = {"model": MODEL, "prompt": "hello"}


@pytest.fixture(scope="module")
def engine():
    return MockEngine(max_slots=4, max_cache_length=128)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, port=0, api_key=KEY) as handle:
        yield handle


@pytest.fixture
def http(server, engine):
    engine.fail_on_submit = engine.fail_after = None
    engine.token_delay = 0.0
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as client:
        yield client
    assert wait_idle(engine) == 0


def wait_idle(engine, seconds=5.0) -> int:
    deadline = time.monotonic() + seconds
    while (engine.active_slots or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.active_slots + engine.queue_depth


def events(lines) -> list:
    """The data of each Server-Sent Event: a parsed chunk, or "[DONE]"."""
    found = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def stream(http, path, body) -> list:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return events(response.iter_lines())


def assert_error(response, status, param, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if param:
        assert error["message"].startswith(f"{param}:"), error["message"]
    if code:
        assert error["code"] == code
    kinds = {429: "rate_limit_error", 500: "server_error"}
    assert error["type"] == kinds.get(status, "invalid_request_error")
    return error


def eventually(condition, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


# ---- 400: every field with a wrong type, range or shape ---------------------------------

CHAT_ERRORS = [
    # types: strict, as the OpenAI API (no "0.5" for 0.5, no 1.5 for a count)
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": [1]}, "temperature"),
    ({"top_p": "x"}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": "0.1"}, "min_p"),
    ({"n": 1.5}, "n"),
    ({"n": "2"}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"seed": "a"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"logprobs": "true"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
    ({"presence_penalty": "x"}, "presence_penalty"),
    ({"frequency_penalty": {}}, "frequency_penalty"),
    ({"user": 5}, "user"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": True}, "stream_options"),
    ({"model": 5}, "model"),
    # shapes
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [1]}, "messages.0"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages.0.role"),
    ({"messages": [*HI, {"role": "user", "content": 5}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),  # the template refuses
    ({"model": None}, "model"),
    # ranges, checked by the engine's SamplingOptions
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),  # beyond the engine's 4 slots
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),  # beyond the context of 128
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"messages": [{"role": "user", "content": "x" * 200}]}, "prompt"),  # beyond the context
]


@pytest.mark.parametrize("fields, param", CHAT_ERRORS, ids=[p for _, p in CHAT_ERRORS])
def test_chat_field_errors_are_400_naming_the_field(http, fields, param):
    response = http.post("/openai/chat/completions", json={**CHAT, **fields})
    assert_error(response, 400, param)


COMPLETION_ERRORS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", [1, 2]]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [104, 5000]}, "prompt"),  # outside the vocabulary
    ({"prompt": [[104], [-1]]}, "prompt.1"),
    ({"prompt": ["fine", "x" * 200]}, "prompt.1"),
    ({"logprobs": True}, "logprobs"),  # an int for completions, not a bool
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": 3, "echo": True, "max_tokens": 2, "prompt": "ab", "n": 9}, "n"),
    ({"echo": "yes"}, "echo"),
    ({"suffix": "after"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 200}, "max_tokens"),
    ({"prompt": None}, "prompt"),
]


@pytest.mark.parametrize("fields, param", COMPLETION_ERRORS, ids=[p for _, p in COMPLETION_ERRORS])
def test_completion_field_errors_are_400_naming_the_field(http, engine, fields, param):
    submitted = len(engine.handles)
    response = http.post("/openai/completions", json={**COMPLETION, **fields})
    assert_error(response, 400, param)
    assert all(h.cancelled.is_set() for h in engine.handles[submitted:])  # none left running


def test_a_missing_model_or_messages_is_400_saying_it_is_required(http):
    error = assert_error(http.post("/openai/chat/completions", json={"messages": HI}), 400, "model")
    assert "required" in error["message"]
    assert_error(http.post("/openai/chat/completions", json={"model": MODEL}), 400, "messages")
    assert_error(http.post("/openai/completions", json={"model": MODEL}), 400, "prompt")


@pytest.mark.parametrize(
    "content, headers, status",
    [
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (b'{"model": "mock-model",}', {"Content-Type": "application/json"}, 400),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400),
        (b'"a string"', {}, 400),
        (b"", {"Content-Type": "application/json"}, 400),
        (b"\xff\xfe\xfa", {"Content-Type": "application/json"}, 400),
        (b"[" * 100_000, {"Content-Type": "application/json"}, 400),
        (b'{"model": "mock-model", "prompt": "hi"}', {"Content-Type": "text/plain"}, 415),
        (b"model=mock-model", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ],
)
def test_bodies_that_are_not_a_json_object_are_rejected(http, content, headers, status):
    response = http.post("/openai/completions", content=content, headers=headers)
    error = assert_error(response, status, None)
    assert error["message"].startswith(("request body:", "Content-Type:"))


def test_a_json_body_with_a_json_media_type_and_charset_is_fine(http):
    body = json.dumps({**COMPLETION, "max_tokens": 2}).encode()
    for media_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = http.post(
            "/openai/completions", content=body, headers={"Content-Type": media_type}
        )
        assert response.status_code == 200, response.text


def test_an_oversized_body_is_413_whether_declared_or_streamed(server):
    app = TestClient(create_app(MockEngine(), max_body_bytes=1000))
    big = json.dumps({**COMPLETION, "prompt": "x" * 2000}).encode()
    assert_error(app.post("/openai/completions", content=big), 413, None, "body_too_large")

    def chunks():  # no Content-Length: the size is only known by reading
        yield big[:500]
        yield big[500:]

    response = app.post("/openai/completions", content=chunks())
    assert_error(response, 413, None, "body_too_large")
    # the default limit, 4 MiB, on the real server
    huge = httpx.post(
        server.url + "/openai/completions",
        content=b"x" * (5 * 2**20),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert_error(huge, 413, None)


def test_unknown_fields_are_ignored_and_null_means_the_default(http):
    body = {
        **CHAT,
        "max_tokens": 3,
        "temperature": None,
        "stop": None,
        "seed": None,
        "logit_bias": {"50": 1},
        "tools": [],
        "reasoning_effort": "low",
        "research": False,
        "something_new": {"a": [1]},
        "user": "someone",
    }
    response = http.post("/openai/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_a_top_k_beyond_the_vocabulary_keeps_every_token(http, engine):
    response = http.post("/openai/completions", json={**COMPLETION, "top_k": 10**30})
    assert response.status_code == 200, response.text
    assert engine.handles[-1].options.top_k == 0  # off: the same thing, without an overflow


def test_content_parts_are_joined(http, engine):
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    response = http.post(
        "/openai/chat/completions",
        json={**CHAT, "messages": [{"role": "user", "content": parts}], "max_tokens": 1},
    )
    assert response.status_code == 200
    assert engine.tokenizer.decode(engine.handles[-1].prompt_ids) == "<user>hello\n<assistant>"


def test_a_model_without_a_chat_template_refuses_chat_and_takes_completions():
    app = TestClient(create_app(MockEngine(chat_template=False)))
    assert_error(
        app.post("/openai/chat/completions", json=CHAT), 400, "messages", "no_chat_template"
    )
    assert app.post("/openai/completions", json={**COMPLETION, "max_tokens": 2}).status_code == 200


# ---- 401, 404, 405 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic c2stbW9jaw==", "Bearer sk-wrong", f"Bearer {KEY}x", KEY],
)
def test_a_missing_or_wrong_key_is_401(server, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    for method, path in [("GET", "/openai/models"), ("POST", "/openai/chat/completions")]:
        response = httpx.request(method, server.url + path, headers=headers, json=CHAT)
        assert_error(response, 401, None, "invalid_api_key")
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_the_key_is_taken_with_any_case_of_bearer(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = httpx.get(
            server.url + "/openai/models", headers={"Authorization": f"{scheme} {KEY}"}
        )
        assert response.status_code == 200


def test_no_key_configured_means_open():
    app = TestClient(create_app(MockEngine()))
    assert app.get("/openai/models").status_code == 200


def test_an_unknown_model_is_404_model_not_found(http):
    for path, body in [("/openai/chat/completions", CHAT), ("/openai/completions", COMPLETION)]:
        response = http.post(path, json={**body, "model": "gpt-4o"})
        error = assert_error(response, 404, "model", "model_not_found")
        assert "gpt-4o" in error["message"] and MODEL in error["message"]
    assert_error(http.get("/openai/models/gpt-4o"), 404, "model", "model_not_found")


def test_unknown_routes_are_404_and_wrong_methods_405(http):
    for path in ("/", "/v1/chat/completions", "/openai/nothing"):
        assert_error(http.get(path), 404, None)
    response = http.get("/openai/chat/completions")
    assert_error(response, 405, None)
    assert response.headers["Allow"] == "POST"
    assert_error(http.delete("/openai/models"), 405, None)


# ---- 429 and 500: the engine's trouble, never the client's ---------------------------------


def test_a_full_queue_is_429_with_retry_after():
    app = TestClient(create_app(MockEngine(max_queue=0)))
    response = app.post("/openai/completions", json=COMPLETION)
    assert_error(response, 429, None, "queue_full")
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_full_queue_midway_through_a_prompt_list_cancels_the_prompts_before_it():
    engine = MockEngine(max_slots=1, max_queue=1, token_delay=0.01)
    with serve(engine, port=0) as small, httpx.Client(base_url=small.url, timeout=30) as http:
        first = {**COMPLETION, "max_tokens": 100, "stream": True}
        with http.stream("POST", "/openai/completions", json=first) as response:
            next(response.iter_lines())  # it holds the only slot now
            both = {**COMPLETION, "prompt": ["a", "b"]}
            assert_error(http.post("/openai/completions", json=both), 429, None, "queue_full")
            assert engine.handles[1].cancelled.is_set() and len(engine.handles) == 2
    assert wait_idle(engine) == 0


def test_an_engine_failure_is_a_500_and_the_server_keeps_serving(http, engine):
    engine.fail_on_submit = RuntimeError("the device fell over")
    response = http.post("/openai/completions", json=COMPLETION)
    error = assert_error(response, 500, None)
    assert error["type"] == "server_error" and "the device fell over" in error["message"]
    engine.fail_on_submit = None
    engine.fail_after = 2
    assert_error(http.post("/openai/chat/completions", json=CHAT), 500, None)
    chunks = stream(http, "/openai/chat/completions", CHAT)
    assert "error" in chunks[-1] and chunks[-1]["error"]["type"] == "server_error"
    assert "[DONE]" not in chunks
    engine.fail_after = None
    assert http.post("/openai/completions", json=COMPLETION).status_code == 200


# ---- the happy paths, as objects ---------------------------------------------------------


def test_models_list_the_served_model_with_its_limits(http):
    listing = http.get("/openai/models").json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "foresight-lab"
    assert isinstance(card["created"], int)
    assert card["context_length"] == card["max_model_len"] == 128
    assert card["max_completion_tokens"] == 127
    assert http.get(f"/openai/models/{MODEL}").json() == card


def test_a_served_model_name_replaces_the_models_own():
    app = TestClient(create_app(MockEngine(), served_model_name="org/forecaster"))
    assert app.get("/openai/models/org/forecaster").json()["id"] == "org/forecaster"
    assert (
        app.post("/openai/completions", json={**COMPLETION, "model": "org/forecaster"}).json()[
            "model"
        ]
        == "org/forecaster"
    )
    assert app.post("/openai/completions", json=COMPLETION).status_code == 404


def test_several_served_names_are_all_accepted_and_the_first_answers():
    names = ["org/forecaster", MODEL, "LightningRodLabs/foresight-v4"]
    app = TestClient(create_app(MockEngine(), served_model_name=names))
    assert [m["id"] for m in app.get("/openai/models").json()["data"]] == names
    for name in names:
        assert app.get(f"/openai/models/{name}").json()["id"] == name
        reply = app.post("/openai/completions", json={**COMPLETION, "model": name})
        assert reply.json()["model"] == "org/forecaster"
    missing = app.post("/openai/completions", json={**COMPLETION, "model": "other"})
    assert missing.status_code == 404
    message = missing.json()["error"]["message"]
    assert "'org/forecaster', 'mock-model', 'LightningRodLabs/foresight-v4'" in message
    with pytest.raises(ValueError, match="served_model_name"):
        create_app(MockEngine(), served_model_name=["org/forecaster", ""])


def test_a_chat_completion_has_every_openai_field(http):
    reply = http.post("/openai/chat/completions", json={**CHAT, "max_tokens": 5, "seed": 3}).json()
    assert set(reply) == {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
    }
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert isinstance(reply["created"], int) and reply["model"] == MODEL
    [choice] = reply["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": choice["message"]["content"]},
        "logprobs": None,
        "finish_reason": "length",
    }
    prompt = len("<user>hi\n<assistant>")
    assert reply["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 5,
        "total_tokens": prompt + 5,
    }


def test_ids_are_unique(http):
    ids = {http.post("/openai/completions", json=COMPLETION).json()["id"] for _ in range(5)}
    assert len(ids) == 5 and all(i.startswith("cmpl-") for i in ids)


def test_the_same_seed_gives_the_same_choices(http):
    body = {**CHAT, "n": 3, "seed": 11, "max_tokens": 8, "temperature": 1}
    first, second = (http.post("/openai/chat/completions", json=body).json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert len(set(texts)) == 3 and [c["index"] for c in first["choices"]] == [0, 1, 2]


def test_k_prompts_and_n_choices_give_k_times_n_choices_prompt_major(http, engine):
    submitted = len(engine.handles)
    body = {
        "model": MODEL,
        "prompt": ["ab", "cd", "ef"],
        "n": 2,
        "seed": 5,
        "temperature": 1,
        "max_tokens": 4,
    }
    out = http.post("/openai/completions", json=body).json()
    assert len(engine.handles) == submitted + 3  # one engine request per prompt
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for c in out["choices"]:
        prompt, choice = body["prompt"][c["index"] // 2], c["index"] % 2
        assert c["text"] == expected_text(prompt, 4, temperature=1, seed=5, choice=choice)
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 24, "total_tokens": 30}


def test_token_id_prompts_are_taken_and_echoed_as_text(http):
    body = {
        "model": MODEL,
        "prompt": [[104, 105], [111, 107]],
        "echo": True,
        "max_tokens": 2,
        "temperature": 0,
    }
    out = http.post("/openai/completions", json=body).json()
    assert [c["text"][:2] for c in out["choices"]] == ["hi", "ok"]
    assert out["choices"][0]["text"] == "hi" + expected_text([104, 105], 2, temperature=0)


def test_stop_strings_end_the_text_even_across_tokens(http):
    free = expected_text("hello", 30, temperature=1, seed=2)
    stop = free[6:9]  # three tokens
    body = {**COMPLETION, "temperature": 1, "seed": 2, "max_tokens": 30, "stop": [stop, "zz"]}
    out = http.post("/openai/completions", json=body).json()["choices"][0]
    assert out["text"] == free[: free.index(stop)] and out["finish_reason"] == "stop"
    chunks = stream(http, "/openai/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == out["text"]


def test_chat_logprobs_carry_token_bytes_and_alternatives(http):
    body = {**CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    [choice] = http.post("/openai/chat/completions", json=body).json()["choices"]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 2
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    without = http.post(
        "/openai/chat/completions", json={**CHAT, "max_tokens": 2, "logprobs": True}
    )
    assert all(e["top_logprobs"] == [] for e in without.json()["choices"][0]["logprobs"]["content"])


def test_completion_logprobs_with_echo_start_with_a_null_for_the_first_prompt_token(http):
    body = {**COMPLETION, "prompt": "abc", "max_tokens": 3, "logprobs": 2, "echo": True}
    [choice] = http.post("/openai/completions", json=body).json()["choices"]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"][:3] == ["a", "b", "c"] and len(logprobs["tokens"]) == 6
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in logprobs["token_logprobs"][1:])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == list(range(6))
    plain = http.post("/openai/completions", json={**body, "echo": False, "logprobs": 0}).json()
    plain_logprobs = plain["choices"][0]["logprobs"]
    assert len(plain_logprobs["tokens"]) == 3 and plain_logprobs["text_offset"] == [0, 1, 2]
    assert plain_logprobs["top_logprobs"] == [{}, {}, {}]


def test_an_impossible_token_gets_a_finite_logprob_json_can_carry():
    from foresight_lab.engine.request import TokenLogprob, TopLogprob
    from foresight_lab.server.routes import chat_logprobs, completion_entries, completion_logprobs

    never = TokenLogprob("a", 97, float("-inf"), (TopLogprob("b", 98, float("nan")),))
    chat = chat_logprobs([never])["content"][0]
    assert chat["logprob"] == chat["top_logprobs"][0]["logprob"] == -9999.0
    legacy = completion_logprobs(completion_entries([never]))
    assert json.dumps(legacy, allow_nan=False)  # would raise on -inf or NaN
    assert legacy["token_logprobs"] == [-9999.0] and legacy["top_logprobs"] == [{"b": -9999.0}]


# ---- streams ---------------------------------------------------------------------------


def test_a_chat_stream_has_a_role_chunk_content_one_finish_per_choice_usage_and_done(http):
    body = {
        **CHAT,
        "n": 2,
        "seed": 4,
        "temperature": 1,
        "max_tokens": 6,
        "stream_options": {"include_usage": True},
    }
    chunks = stream(http, "/openai/chat/completions", body)
    assert chunks[-1] == "[DONE]"
    *chunks, usage_chunk, _ = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    assert len({c["id"] for c in [*chunks, usage_chunk]}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert all(len(c["choices"]) == 1 for c in chunks)
    del body["stream_options"]
    whole = http.post("/openai/chat/completions", json=body).json()
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        content = mine[1:-1]
        assert all(c["delta"]["content"] and c["finish_reason"] is None for c in content)
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
        assert [c["finish_reason"] for c in mine].count("length") == 1
        text = "".join(c["delta"]["content"] for c in content)
        assert text == whole["choices"][index]["message"]["content"]


def test_without_include_usage_chunks_carry_no_usage(http):
    chunks = stream(http, "/openai/chat/completions", {**CHAT, "max_tokens": 2})
    assert all("usage" not in c for c in chunks[:-1]) and chunks[-1] == "[DONE]"


def test_a_completion_stream_echoes_once_and_keeps_text_offsets_running(http):
    body = {
        **COMPLETION,
        "prompt": "ab",
        "max_tokens": 4,
        "logprobs": 1,
        "echo": True,
        "temperature": 0,
    }
    chunks = stream(http, "/openai/completions", body)
    assert chunks[-1] == "[DONE]"
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    text = "".join(c["text"] for c in choices)
    whole = http.post("/openai/completions", json=body).json()["choices"][0]
    assert text == whole["text"] == "ab" + expected_text("ab", 4, temperature=0)
    offsets = [o for c in choices if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"] == list(range(6))
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]


def test_a_streamed_prompt_list_indexes_choices_prompt_major(http):
    body = {
        "model": MODEL,
        "prompt": ["ab", "cd"],
        "n": 2,
        "seed": 1,
        "temperature": 1,
        "max_tokens": 3,
    }
    chunks = stream(
        http, "/openai/completions", {**body, "stream_options": {"include_usage": True}}
    )
    texts: dict[int, str] = {}
    for chunk in chunks[:-2]:
        [c] = chunk["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    whole = http.post("/openai/completions", json=body).json()
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert chunks[-2]["usage"] == whole["usage"]


# ---- disconnects and the event loop ------------------------------------------------------


def test_a_client_that_leaves_mid_stream_cancels_its_request(http, engine):
    engine.token_delay = 0.01
    for path, body in [("/openai/chat/completions", CHAT), ("/openai/completions", COMPLETION)]:
        with http.stream(
            "POST", path, json={**body, "max_tokens": 100, "stream": True}
        ) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert engine.active_slots == 1
        assert wait_idle(engine) == 0
        assert engine.handles[-1].cancelled.is_set()


def test_a_client_that_leaves_while_waiting_for_a_whole_reply_cancels_it(server, engine, http):
    engine.token_delay = 0.02
    with pytest.raises(httpx.ReadTimeout):
        http.post("/openai/completions", json={**COMPLETION, "max_tokens": 100}, timeout=0.3)
    assert wait_idle(engine) == 0
    assert engine.handles[-1].cancelled.is_set()


def test_a_queued_request_whose_client_left_never_runs():
    # The first request holds the slot for 6 s unless its client leaves; a shorter hold
    # could end before the second request arrives on a busy machine, which would not queue.
    engine = MockEngine(max_slots=1, token_delay=0.2)
    with serve(engine, port=0) as small, httpx.Client(base_url=small.url, timeout=30) as http:
        body = {**COMPLETION, "max_tokens": 30, "stream": True}
        with http.stream("POST", "/openai/completions", json=body) as holder:
            next(holder.iter_lines())
            with http.stream("POST", "/openai/completions", json=body):
                assert eventually(lambda: engine.queue_depth == 1)
            assert eventually(lambda: engine.handles[1].cancelled.is_set())
    assert wait_idle(engine) == 0
    assert engine.started == engine.handles[:1]


def test_slow_generation_does_not_block_other_requests(http, engine):
    engine.token_delay = 0.02
    result = {}
    slow = threading.Thread(
        target=lambda: result.update(
            r=http.post("/openai/completions", json={**COMPLETION, "max_tokens": 50})
        )
    )
    slow.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert http.get("/openai/models").status_code == 200
    assert time.monotonic() - started < 0.5
    slow.join()
    assert result["r"].json()["usage"]["completion_tokens"] == 50


def test_concurrent_clients_get_their_own_completions(server, engine):
    engine.token_delay = 0.002
    prompts = [f"prompt number {i}" for i in range(12)]  # more than the 4 slots: some wait

    async def main():
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ) as client:
            calls = [
                client.post(
                    "/openai/completions",
                    json={**COMPLETION, "prompt": p, "temperature": 0, "max_tokens": 10},
                )
                for p in prompts
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    engine.token_delay = 0
    assert [r.json()["choices"][0]["text"] for r in replies] == [
        expected_text(p, 10, temperature=0) for p in prompts
    ]


# ---- serve() --------------------------------------------------------------------------


def test_serve_on_a_port_in_use_raises_at_once(server):
    with pytest.raises(OSError):
        serve(MockEngine(), port=server.port)


def test_serve_with_port_0_reports_the_port_and_stops_twice_safely():
    handle = serve(MockEngine(), port=0)
    assert handle.port > 0 and handle.url == f"http://127.0.0.1:{handle.port}"
    assert handle.base_url == handle.url + "/openai"
    assert httpx.get(handle.base_url + "/models").status_code == 200
    handle.stop()
    handle.stop()
    assert not handle.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(handle.base_url + "/models")


def test_stop_cuts_open_streams_and_cancels_their_requests():
    engine = MockEngine(token_delay=0.05)  # 120 tokens: 6 s
    handle = serve(engine, port=0, shutdown_timeout=0.3)
    body = {**COMPLETION, "max_tokens": 120, "stream": True}
    with httpx.stream("POST", handle.url + "/openai/completions", json=body) as response:
        next(response.iter_lines())
        started = time.monotonic()
        handle.stop()
    assert time.monotonic() - started < 3 and not handle.running
    assert wait_idle(engine) == 0 and engine.handles[-1].cancelled.is_set()


def test_serving_beyond_loopback_without_a_key_warns():
    with (
        pytest.warns(UserWarning, match="without an API key"),
        serve(MockEngine(), host="0.0.0.0", port=0),
    ):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        serve(MockEngine(), host="0.0.0.0", port=0, api_key="k").stop()
        serve(MockEngine(), host="127.0.0.1", port=0).stop()
