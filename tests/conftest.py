"""Shared fixtures: one tiny engine and one real model per session, compiled once."""

from __future__ import annotations

import contextlib

import pytest

from foresight_lab.engine.kv_cache import EngineConfig
from foresight_lab.lab import Lab
from tests.tiny import tiny_loaded_model

# Small limits keep the number of shapes (so compilations) low; 16 slots, so a request
# can run among 15 others.
TINY_ENGINE = EngineConfig(
    max_slots=16, max_cache_length=256, prefill_chunk=64, min_cache_bucket=64
)


def run_concurrently(lab: Lab, requests: list) -> list:
    """Submits every (prompt, options) at once so they share decode steps; returns results.

    The scheduler waits for its device lock before it admits anyone, so all of them are
    queued when it next looks."""
    with lab.engine._scheduler._device:
        handles = [lab.engine.submit(prompt, options) for prompt, options in requests]
    return [h.result() for h in handles]


def logprob_trace(completion) -> list[tuple[int, float]]:
    """(token, logprob) of each token of a completion's first choice (asked with logprobs)."""
    return [(e.token_id, e.logprob) for e in completion.choices[0].logprobs]


@contextlib.contextmanager
def recording_calls(lab: Lab, name: str):
    """Yields a list that gets the positional arguments of each call the lab's engine
    makes to its compiled function `name` ("decode", "prefill", ...)."""
    steps = lab.engine._scheduler.steps
    function, calls = getattr(steps, name), []

    def record(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    setattr(steps, name, record)
    try:
        yield calls
    finally:
        setattr(steps, name, function)


@pytest.fixture(scope="session")
def tiny_lab() -> Lab:
    lab = Lab(tiny_loaded_model("llama"), TINY_ENGINE)
    yield lab
    lab.engine.shutdown()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF, fetched into the cache once."""
    from foresight_lab.weights import registry

    return registry.resolve("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2_lab(smollm2_path) -> Lab:
    import foresight_lab as fl

    lab = fl.load("smollm2-135m", max_slots=4, max_cache_length=512, progress=False)
    yield lab
    lab.engine.shutdown()
