"""Foresight's forecasting fields over HTTP (answer_type, reasoning_effort, research,
options), with raw HTTP, the `openai` client, and Lightning Rod's own SDK, against a
real server on the tiny model."""

from __future__ import annotations

import json
import re

import httpx
import lightningrod
import openai
import pytest

from foresight_lab.forecasting import answers
from foresight_lab.server.serve import serve

NOTES = [
    {"url": "https://example.org/fed", "title": "Fed", "text": "Fed cuts rates."},
    {"url": "https://example.org/cat", "title": "Cat", "text": "Cats nap."},
]
RAIN = "Will it rain?"
PICK = "Who wins?\nA) Ann\nB) Bob"


@pytest.fixture(scope="module")
def server(tiny_lab, tmp_path_factory):
    tiny_lab.add_source("notes", NOTES)
    memo = tmp_path_factory.mktemp("sources") / "memo.txt"
    memo.write_text("Snow is due.")
    tiny_lab.add_source("files", [memo])
    handle = tiny_lab.serve(port=0)
    yield handle
    handle.stop()
    tiny_lab.forecaster.sources.remove("notes")
    tiny_lab.forecaster.sources.remove("files")


def ask(server, question=RAIN, timeout=120, **fields) -> httpx.Response:
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": question}],
        "seed": 1,
        **fields,
    }
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=timeout)


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "answer_type, question, pattern",
    [
        ("binary", RAIN, r"<answer>0\.\d+</answer>"),
        ("BINARY", RAIN, r"<answer>0\.\d+</answer>"),
        (
            "Multiple_Choice",
            PICK,
            r'<options>\{"A": "Ann", "B": "Bob"\}</options><answer>\{"A": [\d.]+, "B": [\d.]+\}</answer>',
        ),
        (
            "continuous",
            "How many will come?",
            r'<answer>\{"mean": [-\d.e+]+, "standard_deviation": [\d.e+]+\}</answer>',
        ),
        ("free_response", "Why?", r"<answer>.*</answer>"),
        ("Auto", RAIN, r"<answer>0\.\d+</answer>"),
        ("auto", PICK, r"<options>.*</options><answer>\{.*\}</answer>"),
    ],
)
def test_each_answer_type_ends_the_content_with_its_answer(server, answer_type, question, pattern):
    content = content_of(ask(server, question, answer_type=answer_type, max_tokens=8))
    assert re.fullmatch(pattern, content, re.DOTALL), content


def test_the_binary_answer_is_the_forecast_of_the_lab(server, tiny_lab):
    served = content_of(ask(server, answer_type="binary"))
    local = tiny_lab.forecast(RAIN, answer_type="binary", seed=1)
    assert float(served.removeprefix("<answer>").removesuffix("</answer>")) == pytest.approx(
        local.binary.probability, abs=1e-4
    )


def test_reasoning_effort_returns_the_thinking_apart_from_the_answer(server):
    response = ask(server, answer_type="binary", reasoning_effort="MEDIUM", temperature=1.0)
    message = response.json()["choices"][0]["message"]
    assert isinstance(message["thinking"], str) and message["thinking"]
    assert "<answer>" not in message["thinking"]
    assert re.fullmatch(r"<answer>[\d.]+</answer>", message["content"])
    assert response.json()["usage"]["completion_tokens"] > 1
    again = ask(server, answer_type="binary", reasoning_effort="medium", temperature=1.0)
    assert again.json()["choices"][0]["message"] == message  # the same seed


def test_reasoning_effort_without_an_answer_type_thinks_then_replies(server):
    message = ask(server, reasoning_effort="high", max_tokens=6).json()["choices"][0]["message"]
    assert message["thinking"] is not None and "<answer>" not in message["content"]
    low = ask(server, reasoning_effort="low", max_tokens=6).json()["choices"][0]["message"]
    assert "thinking" not in low  # low effort is a plain reply


def test_research_cites_the_registered_source(server):
    response = ask(server, "Fed cuts?", answer_type="binary", research={"sources": ["notes"]})
    message = response.json()["choices"][0]["message"]
    assert message["annotations"] == [
        {
            "type": "url_citation",
            "url_citation": {
                "url": "https://example.org/fed",
                "title": "Fed",
                "start_index": 0,
                "end_index": len(message["content"]),
            },
        }
    ]
    assert content_of(ask(server, "Fed cuts?", answer_type="binary", research=True))


def test_research_reads_a_registered_local_file(server):
    response = ask(server, "Snow due?", answer_type="binary", research={"sources": ["files"]})
    [citation] = response.json()["choices"][0]["message"]["annotations"]
    assert citation["url_citation"]["url"].startswith("file://")
    assert citation["url_citation"]["title"] == "memo.txt"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"answer_type": "yes_no"}, "answer_type"),
        ({"answer_type": 3}, "answer_type"),
        ({"answer_type": ""}, "answer_type"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"reasoning_effort": "extreme", "answer_type": "binary"}, "reasoning_effort"),
        ({"reasoning_effort": True}, "reasoning_effort"),
        ({"research": {"sources": ["web"]}}, "research.sources"),
        ({"research": "yes"}, "research"),
        ({"research": {"sources": "notes"}}, "research.sources"),
        ({"answer_type": "multiple_choice"}, "options"),
        ({"answer_type": "multiple_choice", "options": ["only"]}, "options"),
        ({"answer_type": "multiple_choice", "options": "A or B"}, "options"),
        ({"options": ["a", "b"]}, "options"),
        ({"answer_type": "binary", "n": 2}, "n"),
        ({"answer_type": "binary", "logprobs": True}, "logprobs"),
        ({"answer_type": "binary", "temperature": 3}, "temperature"),
        ({"answer_type": "binary", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_forecast_fields_are_400s_naming_the_field(server, fields, param):
    response = ask(server, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]
    assert content_of(ask(server, answer_type="binary"))  # still serving


def test_research_with_nothing_registered_is_a_400(tiny_lab):
    with serve(tiny_lab.engine, port=0) as bare:  # a server without the lab's sources
        response = ask(bare, answer_type="binary", research=True)
    assert response.status_code == 400
    assert "no research sources are registered" in response.json()["error"]["message"]


def _events(server, **fields) -> list[dict]:
    with httpx.stream(
        "POST",
        server.base_url + "/chat/completions",
        json={
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "Fed cuts?"}],
            "seed": 7,
            "stream": True,
            **fields,
        },
        timeout=120,
    ) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_streamed_forecast_sends_the_thinking_first_and_equals_the_reply(server):
    fields = dict(
        answer_type="binary",
        reasoning_effort="medium",
        research=True,
        temperature=1.0,
        stream_options={"include_usage": True},
    )
    events = _events(server, **fields)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    kinds = [k for d in deltas for k in d if k in ("thinking", "content") and d[k]]
    assert kinds == sorted(kinds, key=["thinking", "content"].index)  # thinking, then content
    assert "thinking" in kinds
    thinking = "".join(d.get("thinking", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    whole = ask(
        server, "Fed cuts?", **{k: v for k, v in fields.items() if k != "stream_options"}, seed=7
    ).json()
    message = whole["choices"][0]["message"]
    assert content == message["content"] and thinking.strip() == message["thinking"]
    finishing = [
        e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]
    ]
    assert len(finishing) == 1 and finishing[0]["delta"]["annotations"] == message["annotations"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_the_openai_client_reads_forecasts_strictly(server):
    client = openai.OpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0, _strict_response_validation=True
    )
    reply = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Fed cuts?"}],
        seed=3,
        extra_body={"answer_type": "binary", "research": True, "reasoning_effort": "medium"},
    )
    message = reply.choices[0].message
    assert message.annotations[0].url_citation.url == "https://example.org/fed"
    assert message.model_extra["thinking"] is not None
    assert answers.parse_answer(message.content, "binary")["probability"] > 0


# ---- Lightning Rod's SDK, unchanged ----------------------------------------------------------


@pytest.fixture(scope="module")
def sdk(server, monkeypatch_module):
    monkeypatch_module.setenv("LIGHTNINGROD_DISABLE_DOTENV", "1")
    monkeypatch_module.delenv("LIGHTNINGROD_BASE_URL", raising=False)
    return lightningrod.LightningRod(api_key="unused", base_url=server.url)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_sdk_predicts_binary(sdk):
    result = sdk.predict(RAIN, model="tiny-llama", answer_type="binary", seed=1)
    assert 0 < result.binary.probability < 1
    assert result.thinking is not None  # the SDK asks for medium effort by default
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.model == "tiny-llama" and result.id.startswith("chatcmpl-")


def test_the_sdk_predicts_multiple_choice_by_option_text(sdk):
    result = sdk.predict(
        PICK, model="tiny-llama", answer_type="multiple_choice", reasoning_effort="low"
    )
    assert set(result.multiple_choice.probabilities) == {"Ann", "Bob"}
    assert sum(result.multiple_choice.probabilities.values()) == pytest.approx(1, abs=1e-3)


def test_the_sdk_predicts_continuous(sdk):
    result = sdk.predict(
        "How many will come?",
        model="tiny-llama",
        answer_type=lightningrod.AnswerType.CONTINUOUS,
        reasoning_effort=lightningrod.ReasoningEffort.LOW,
        seed=2,
    )
    assert (
        result.continuous.standard_deviation >= 0
        and result.continuous.mean == result.continuous.mean
    )


def test_the_sdk_predicts_free_response_with_sources(sdk):
    result = sdk.predict(
        "Fed cuts?",
        model="tiny-llama",
        answer_type="free_response",
        research=["notes"],
        reasoning_effort="low",
        max_tokens=6,
        seed=4,
    )
    assert isinstance(result.free_response.text, str)
    assert [(s.url, s.title) for s in result.sources] == [("https://example.org/fed", "Fed")]


def test_the_sdk_sees_a_bad_value_as_an_api_error(sdk):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.predict(RAIN, model="tiny-llama", answer_type="probability")
    assert raised.value.body["param"] == "answer_type"


def test_the_sdk_needs_no_model_when_the_server_answers_to_its_default_name(tiny_lab):
    names = [tiny_lab.name, lightningrod.DEFAULT_MODEL]
    with tiny_lab.serve(port=0, served_model_name=names) as server:
        sdk = lightningrod.LightningRod(api_key="unused", base_url=server.url)
        result = sdk.predict(RAIN, answer_type="binary", reasoning_effort="low")
    assert 0 < result.binary.probability < 1 and result.model == tiny_lab.name
