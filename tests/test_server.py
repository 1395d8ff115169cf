"""The Foresight API on a real uvicorn server, called with the official `openai` client."""

import asyncio
import concurrent.futures
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from foresight_lab.engine.kv_cache import EngineConfig
from foresight_lab.lab import Lab

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tiny_lab):
    handle = tiny_lab.serve(port=0, api_key=KEY)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.base_url, api_key=KEY, max_retries=0, _strict_response_validation=True
    )


def raw(server, method, path, **kwargs):
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


def wait_idle(lab, seconds=10):
    deadline = time.monotonic() + seconds
    while lab.engine.active_slots and time.monotonic() < deadline:
        time.sleep(0.02)
    return lab.engine.active_slots


# ---- the happy paths ---------------------------------------------------------------


def test_models_lists_the_served_model_with_its_limits(client, tiny_lab):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_lab.name]
    card = client.models.retrieve(tiny_lab.name)
    assert card.owned_by == "foresight-lab"
    assert card.model_extra["context_length"] == 256


def test_chat_completion_equals_the_notebook_api(client, tiny_lab):
    reply = client.chat.completions.create(
        model=tiny_lab.name, messages=HELLO, temperature=0, max_tokens=10
    )
    expected = tiny_lab.chat(HELLO, temperature=0, max_tokens=10)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert reply.usage.total_tokens == expected.usage.total_tokens


def test_streamed_chat_equals_the_whole_reply_at_temperature_0(client, tiny_lab):
    kwargs = dict(model=tiny_lab.name, messages=HELLO, temperature=0, max_tokens=20)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_n_choices_with_a_seed_are_reproducible(client, tiny_lab):
    kwargs = dict(model=tiny_lab.name, messages=HELLO, temperature=1.0, seed=5, n=3, max_tokens=8)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    assert first.usage.completion_tokens == 24


def test_streamed_n_choices_each_finish_once(client, tiny_lab):
    stream = client.chat.completions.create(
        model=tiny_lab.name, messages=HELLO, n=2, seed=1, max_tokens=6, stream=True
    )
    finishes = [
        (c.index, c.finish_reason) for chunk in stream for c in chunk.choices if c.finish_reason
    ]
    assert sorted(finishes) == [(0, "length"), (1, "length")]


def test_completions_with_a_list_of_prompts_and_n(client, tiny_lab):
    prompts = ["the quick brown", "hello"]
    out = client.completions.create(
        model=tiny_lab.name, prompt=prompts, n=2, seed=3, temperature=0.8, max_tokens=5
    )
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        expected = tiny_lab.generate(prompt, n=2, seed=3, temperature=0.8, max_tokens=5)
        assert [c.text for c in out.choices[2 * i : 2 * i + 2]] == [
            c.text for c in expected.choices
        ]
    assert out.usage.completion_tokens == 20
    assert out.usage.prompt_tokens == sum(len(tiny_lab.tokenize(p)) for p in prompts)


def test_streamed_completion_equals_the_whole_text(server, client, tiny_lab):
    kwargs = dict(model=tiny_lab.name, prompt="hello world", temperature=0, max_tokens=12)
    whole = client.completions.create(**kwargs).choices[0].text
    # The SDK types a completion chunk's finish_reason as never null, so strict
    # validation rejects every chunk but the last from any server (OpenAI's included).
    lenient = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    chunks = list(lenient.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_stop_ends_the_text_before_the_stop(client, tiny_lab):
    free = tiny_lab.generate("hello world", temperature=1.0, seed=5, max_tokens=30).text
    stop = free[8:10]
    out = client.completions.create(
        model=tiny_lab.name,
        prompt="hello world",
        temperature=1.0,
        seed=5,
        max_tokens=30,
        stop=[stop],
    )
    assert out.choices[0].text == free[: free.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_chat_logprobs_with_alternatives(client, tiny_lab):
    reply = client.chat.completions.create(
        model=tiny_lab.name,
        messages=HELLO,
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_completion_logprobs_with_echo_cover_prompt_and_completion(server, tiny_lab):
    # Raw HTTP: the first echoed token's logprob is null, as OpenAI sends it, which the
    # SDK's types (a list of floats) do not allow for.
    prompt = "the quick brown"
    body = {"model": tiny_lab.name, "prompt": prompt, "temperature": 0, "max_tokens": 3}
    out = raw(server, "POST", "/openai/completions", json={**body, "logprobs": 2, "echo": True})
    choice = out.json()["choices"][0]
    plain = tiny_lab.generate(prompt, temperature=0, max_tokens=3, logprobs=True)
    assert choice["text"] == prompt + plain.text
    logprobs = choice["logprobs"]
    prompt_ids = tiny_lab.tokenize(prompt)
    assert len(logprobs["tokens"]) == len(prompt_ids) + 3
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][-3:] == pytest.approx(
        [e.logprob for e in plain.choices[0].logprobs]
    )
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_completion_logprobs_without_echo_through_the_client(client, tiny_lab):
    out = client.completions.create(
        model=tiny_lab.name, prompt="the quick brown", temperature=0, max_tokens=3, logprobs=1
    )
    logprobs = out.choices[0].logprobs
    assert "".join(logprobs.tokens) == out.choices[0].text and len(logprobs.tokens) == 3
    assert logprobs.text_offset[0] == 0 and all(v <= 0 for v in logprobs.token_logprobs)


def test_max_completion_tokens_wins_over_max_tokens(client, tiny_lab):
    # ignore_eos: the random tiny model may sample its EOS within three tokens.
    reply = client.chat.completions.create(
        model=tiny_lab.name,
        messages=HELLO,
        max_tokens=50,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_unknown_fields_and_foresights_plain_defaults_leave_a_plain_reply(client, tiny_lab):
    reply = client.chat.completions.create(
        model=tiny_lab.name,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        max_tokens=2,
        user="someone",
        extra_body={"reasoning_effort": "low", "research": False, "foo": 1, "ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 2 and "<answer>" not in reply.choices[0].message.content


# ---- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"messages": HELLO, "temperature": 3}, 400, "temperature"),
        ({"messages": HELLO, "top_p": 0}, 400, "top_p"),
        ({"messages": HELLO, "n": 0}, 400, "n"),
        ({"messages": HELLO, "n": 17}, 400, "n"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 1000}, 400, "max_tokens"),
        ({"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
        ({"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"content": "no role"}]}, 400, "messages.0.role"),
        ({}, 400, "messages"),
        ({"messages": HELLO, "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_get_the_openai_error_body_naming_the_field(
    server, tiny_lab, body, status, param
):
    response = raw(
        server, "POST", "/openai/chat/completions", json={"model": tiny_lab.name, **body}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_the_openai_client_raises_its_own_error_types(client, tiny_lab):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=tiny_lab.name, messages=HELLO, temperature=2.5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)


def test_a_full_queue_is_429_with_retry_after(tiny_lab):
    lab = Lab(tiny_lab.model, EngineConfig(max_slots=1, max_cache_length=128, max_queue=1))
    with lab.serve(port=0) as server:
        body = {"model": lab.name, "prompt": "hello", "max_tokens": 100, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(
                pool.map(lambda _: raw(server, "POST", "/openai/completions", json=body), range(6))
            )
    lab.engine.shutdown()
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1" and limited.json()["error"]["code"] == "queue_full"


# ---- concurrency, disconnects, lifecycle -------------------------------------------


def test_concurrent_clients_get_their_own_completions(client, tiny_lab):
    prompts = [f"the quick brown {word}" for word in "abcdefgh"]
    expected = [tiny_lab.generate(p, temperature=0, max_tokens=12).text for p in prompts]

    def ask(prompt):
        out = client.completions.create(
            model=tiny_lab.name, prompt=prompt, temperature=0, max_tokens=12
        )
        return out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, prompts)) == expected


def test_a_seeded_request_gives_the_same_text_beside_eight_others(client, tiny_lab):
    mine = dict(model=tiny_lab.name, messages=HELLO, temperature=1.0, seed=42, max_tokens=16)
    alone = client.chat.completions.create(**mine).choices[0].message.content

    def other(i):
        return client.completions.create(
            model=tiny_lab.name,
            prompt=f"other {i}",
            temperature=1.0,
            seed=i,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        others = [pool.submit(other, i) for i in range(8)]
        beside = pool.submit(lambda: client.chat.completions.create(**mine))
        assert beside.result().choices[0].message.content == alone
        assert all(f.result().usage.completion_tokens == 24 for f in others)


def test_async_clients_are_served_concurrently(server, tiny_lab):
    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key=KEY, max_retries=0
        ) as client:
            calls = [
                client.chat.completions.create(
                    model=tiny_lab.name, messages=HELLO, seed=i, max_tokens=6
                )
                for i in range(6)
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    assert all(r.usage.completion_tokens == 6 for r in replies)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, tiny_lab):
    body = {
        "model": tiny_lab.name,
        "prompt": "hello",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST",
        server.url + "/openai/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert tiny_lab.engine.active_slots == 1
    assert wait_idle(tiny_lab) == 0


def test_serve_works_inside_a_running_event_loop_twice_in_a_row(tiny_lab):
    async def inside_a_kernel():  # a Jupyter kernel's loop is running while cells execute
        asyncio.get_running_loop()
        seen = []
        for _ in range(2):
            handle = tiny_lab.serve(port=0)
            ticks = 0

            async def tick():  # the caller's loop keeps running while the server answers
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.ensure_future(tick())
            async with httpx.AsyncClient(base_url=handle.base_url, timeout=60) as http:
                reply = await http.post(
                    "/completions",
                    json={
                        "model": tiny_lab.name,
                        "prompt": "hi",
                        "max_tokens": 4,
                        "ignore_eos": True,  # a random model may end early
                    },
                )
            ticker.cancel()
            handle.stop()
            seen.append(
                (handle.port, reply.json()["usage"]["completion_tokens"], ticks, handle.running)
            )
        return seen

    (port_a, tokens_a, ticks_a, running_a), (port_b, tokens_b, _, running_b) = asyncio.run(
        inside_a_kernel()
    )
    assert port_a > 0 and port_b > 0 and tokens_a == tokens_b == 4
    assert ticks_a > 0 and not running_a and not running_b
    with tiny_lab.serve(port=0) as again:
        assert httpx.get(again.base_url + "/models").status_code == 200
    assert not again.running


def test_lab_serve_takes_the_key_from_the_environment(tiny_lab, monkeypatch):
    monkeypatch.setenv("FORESIGHT_LAB_API_KEY", "sk-from-env")
    with tiny_lab.serve(port=0) as server:
        assert httpx.get(server.base_url + "/models").status_code == 401
        ok = httpx.get(server.base_url + "/models", headers={"Authorization": "Bearer sk-from-env"})
        assert ok.status_code == 200


def test_serving_beyond_loopback_without_a_key_warns(tiny_lab):
    with (
        pytest.warns(UserWarning, match="without an API key"),
        tiny_lab.serve(host="0.0.0.0", port=0),
    ):
        pass


def start_cli(*args: str, timeout: float = 180):
    """`foresight-lab serve ... --port 0` as a subprocess; (process, its base URL, its output lines)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "foresight_lab", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FORESIGHT_LAB_PROGRESS": "0"},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in process.stdout], daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline and process.poll() is None:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            continue
        if match := re.search(r"Serving \S+ at (http://\S+/openai)", seen[-1]):
            return process, match.group(1), lines
    process.kill()
    raise AssertionError("the server did not start:\n" + "".join(seen))


def test_the_cli_serves_a_model_directory_and_stops_on_ctrl_c(tmp_path):
    from tests.tiny import tiny_hf_model, tiny_hf_tokenizer

    directory = tmp_path / "tiny-qwen3"
    tiny_hf_model("qwen3").save_pretrained(directory)
    tiny_hf_tokenizer().save_pretrained(directory)
    options = ["--api-key", KEY, "--max-cache-length", "128", "--max-slots", "2", "--warmup"]
    process, base_url, _ = start_cli(str(directory), *options, "--kv-cache-dtype", "float32")
    metrics_url = base_url.removesuffix("/openai") + "/metrics"

    def metric(name: str) -> float:
        text = httpx.get(metrics_url).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def compilations() -> float:
        return metric("foresight_compilations_total")

    try:
        warm = compilations()
        response = httpx.post(
            base_url + "/completions",
            json={"model": "tiny-qwen3", "prompt": "hello", "max_tokens": 3, "ignore_eos": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
        assert warm > 0 and compilations() == warm  # --warmup compiled everything first
        # Keys and values of 2 layers x 2 kv heads x 32 dims, 2 x 128 positions, 4 bytes.
        assert metric("foresight_kv_cache_bytes") == 2 * (2 * 2 * 32) * (2 * 128) * 4
        assert httpx.get(base_url + "/models").status_code == 401
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.real_model
def test_the_cli_serves_the_default_model_under_a_chosen_name_and_stops_on_sigterm(smollm2_path):
    options = [
        "--served-model-name",
        "foresight-mini",
        "--max-cache-length",
        "256",
        "--max-slots",
        "2",
    ]
    process, base_url, _ = start_cli(*options)
    try:
        client = openai.OpenAI(
            base_url=base_url, api_key="unused", _strict_response_validation=True
        )
        assert [m.id for m in client.models.list()] == ["foresight-mini"]
        reply = client.chat.completions.create(
            model="foresight-mini",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )
        assert "Paris" in reply.choices[0].message.content
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.real_model
def test_the_real_model_over_http_streams_what_it_answers(smollm2_lab):
    with smollm2_lab.serve(port=0, api_key=KEY) as server:
        client = openai.OpenAI(
            base_url=server.base_url, api_key=KEY, _strict_response_validation=True
        )
        assert [m.id for m in client.models.list()] == ["smollm2-135m"]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        kwargs = dict(model="smollm2-135m", messages=question, temperature=0, max_tokens=24)
        whole = client.chat.completions.create(**kwargs)
        chunks = list(
            client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        )
        short = client.chat.completions.create(**{**kwargs, "max_completion_tokens": 2})
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


@pytest.mark.real_model
def test_the_real_model_completes_prompt_lists_with_seeds_stops_and_logprobs(smollm2_lab):
    prompts = ["The capital of France is", "1, 2, 3,"]
    with smollm2_lab.serve(port=0) as server:
        client = openai.OpenAI(
            base_url=server.base_url, api_key="unused", _strict_response_validation=True
        )
        sampled = dict(model="smollm2-135m", prompt=prompts, n=2, seed=7, max_tokens=6)
        first = client.completions.create(**sampled, temperature=0.8)
        again = client.completions.create(**sampled, temperature=0.8)
        stopped = client.completions.create(
            model="smollm2-135m", prompt="1, 2, 3,", temperature=0, max_tokens=20, stop=[" 6"]
        )
        echoed = raw(
            server,
            "POST",
            "/openai/completions",
            json={
                "model": "smollm2-135m",
                "prompt": prompts[0],
                "max_tokens": 2,
                "temperature": 0,
                "logprobs": 1,
                "echo": True,
            },
        ).json()["choices"][0]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    expected = smollm2_lab.generate(prompts[1], n=2, seed=7, max_tokens=6, temperature=0.8)
    assert [c.text for c in first.choices[2:]] == [c.text for c in expected.choices]
    assert stopped.choices[0].text == " 4, 5," and stopped.choices[0].finish_reason == "stop"
    assert echoed["text"].startswith(prompts[0] + " Paris")
    assert echoed["logprobs"]["token_logprobs"][0] is None
    assert "".join(echoed["logprobs"]["tokens"]) == echoed["text"]
