"""GET /metrics: Prometheus text with the server's counters and the engine's figures, on
the mock engine (and once on the tiny real engine, for its compile count)."""

import json
import re
import time

import pytest
from starlette.testclient import TestClient

from foresight_lab.engine.request import SamplingOptions
from foresight_lab.server import create_app
from tests.mock_engine import MockEngine

MODEL = "mock-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
COMPLETION = {"model": MODEL, "prompt": ["hello", "hi"], "max_tokens": 3, "n": 2}
FAMILIES = {
    "foresight_requests_total": "counter",
    "foresight_prompt_tokens_total": "counter",
    "foresight_completion_tokens_total": "counter",
    "foresight_queue_depth": "gauge",
    "foresight_active_slots": "gauge",
    "foresight_max_slots": "gauge",
    "foresight_kv_cache_bytes": "gauge",
    "foresight_compilations_total": "counter",
}
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)",?')


def parse(text: str) -> tuple[dict[str, str], dict[tuple, float]]:
    """Prometheus text format, the part this server writes: ({name: type}, {(name,
    (label, value), ...): value}); asserts every sample's family was declared first."""
    types, helps, samples = {}, set(), {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        else:
            name, labels, value = SAMPLE.fullmatch(line).groups()
            assert name in types and name in helps, f"{name} has no TYPE or HELP line"
            pairs = tuple(LABEL.findall(labels or ""))
            samples[(name, *pairs)] = float(value)
    return types, samples


def scrape(app: TestClient) -> dict[tuple, float]:
    response = app.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)[1]


def requests(route: str, status: str) -> tuple:
    return ("foresight_requests_total", ("route", route), ("status", status))


def tokens(samples) -> tuple[float, float]:
    return (
        samples[("foresight_prompt_tokens_total",)],
        samples[("foresight_completion_tokens_total",)],
    )


@pytest.fixture
def engine():
    return MockEngine(max_slots=4, max_cache_length=128)


@pytest.fixture
def app(engine):
    return TestClient(create_app(engine))


def test_metrics_are_prometheus_text_with_every_family(app):
    response = app.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    types, samples = parse(response.text)
    assert types == FAMILIES
    assert tokens(samples) == (0, 0)


def test_prometheus_own_parser_reads_them(app):
    parser = pytest.importorskip("prometheus_client.parser")
    app.post("/openai/chat/completions", json=CHAT)
    families = {f.name: f for f in parser.text_string_to_metric_families(app.get("/metrics").text)}
    # prometheus_client names a counter family without its _total suffix
    assert {name.removesuffix("_total") for name in FAMILIES} == set(families)
    [sample] = families["foresight_requests"].samples
    assert sample.labels == {"route": "/openai/chat/completions", "status": "2xx"}


def test_chat_and_completion_raise_the_counters_by_the_usage_they_report(app):
    chat = app.post("/openai/chat/completions", json=CHAT).json()["usage"]
    samples = scrape(app)
    assert samples[requests("/openai/chat/completions", "2xx")] == 1
    assert tokens(samples) == (chat["prompt_tokens"], chat["completion_tokens"])

    completion = app.post("/openai/completions", json=COMPLETION).json()["usage"]
    assert completion["completion_tokens"] == 2 * 2 * 3  # two prompts, n = 2
    samples = scrape(app)
    assert samples[requests("/openai/completions", "2xx")] == 1
    assert tokens(samples) == (
        chat["prompt_tokens"] + completion["prompt_tokens"],
        chat["completion_tokens"] + completion["completion_tokens"],
    )


def streamed_usage(app: TestClient, path: str, body: dict) -> dict:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with app.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    return json.loads(lines[-1].removeprefix("data: "))["usage"]


def test_streams_count_the_usage_they_report(app):
    chat = streamed_usage(app, "/openai/chat/completions", CHAT)
    completion = streamed_usage(app, "/openai/completions", COMPLETION)
    samples = scrape(app)
    assert samples[requests("/openai/chat/completions", "2xx")] == 1
    assert samples[requests("/openai/completions", "2xx")] == 1
    assert tokens(samples) == (
        chat["prompt_tokens"] + completion["prompt_tokens"],
        chat["completion_tokens"] + completion["completion_tokens"],
    )


def test_a_stream_cut_short_counts_the_tokens_it_sent(app, engine):
    engine.fail_after = 2
    with app.stream(
        "POST", "/openai/completions", json={**COMPLETION, "n": 1, "stream": True}
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert '"error"' in events[-1]
    prompt_tokens, completion_tokens = tokens(scrape(app))
    assert prompt_tokens == len("hello") + len("hi")  # one byte per token
    assert completion_tokens >= 2  # what was sent before the failure


def test_errors_count_under_their_status_class_and_route(app, engine):
    response = app.post("/openai/chat/completions", json={**CHAT, "temperature": 3})
    assert response.status_code == 400
    assert app.get("/openai/chat/completions").status_code == 405
    assert app.get("/openai/models/gpt-4o").status_code == 404
    assert app.get("/v1/models").status_code == 404
    engine.fail_on_submit = RuntimeError("boom")
    assert app.post("/openai/completions", json=COMPLETION).status_code == 500
    samples = scrape(app)
    assert samples[requests("/openai/chat/completions", "4xx")] == 2
    assert samples[requests("/openai/models/{model_id}", "4xx")] == 1  # the template
    assert samples[requests("other", "4xx")] == 1  # every unknown path, one label
    assert samples[requests("/openai/completions", "5xx")] == 1
    assert tokens(samples) == (0, 0)  # no answer, no tokens


def test_scrapes_are_not_counted(app):
    scrape(app)
    samples = scrape(app)
    assert not [key for key in samples if key[0] == "foresight_requests_total"]


def test_engine_figures_are_read_at_each_scrape(app, engine):
    engine.compile_count = 3
    engine.token_delay = 0.05
    handle = engine.submit([1, 2, 3], SamplingOptions(max_tokens=100, n=2))
    deadline = time.monotonic() + 5
    while engine.active_slots < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    samples = scrape(app)
    handle.cancel()
    assert samples[("foresight_active_slots",)] == 2
    assert samples[("foresight_max_slots",)] == 4
    assert samples[("foresight_kv_cache_bytes",)] == engine.kv_cache_bytes() == 4 * 128 * 64
    assert samples[("foresight_queue_depth",)] == 0
    assert samples[("foresight_compilations_total",)] == 3


def test_metrics_are_open_even_with_a_key(engine):
    app = TestClient(create_app(engine, api_key="sk-metrics"))
    assert app.get("/openai/models").status_code == 401
    samples = scrape(app)  # no Authorization header
    assert samples[requests("/openai/models", "4xx")] == 1


def test_the_real_engine_reports_its_compile_count(tiny_lab):
    app = TestClient(create_app(tiny_lab.engine))
    body = {"model": tiny_lab.engine.model.name, "prompt": "hello", "max_tokens": 2}
    assert app.post("/openai/completions", json=body).status_code == 200
    compiles = scrape(app)[("foresight_compilations_total",)]
    assert compiles == tiny_lab.engine.compile_count > 0
