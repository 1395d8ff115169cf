"""Shared fixtures: one tiny engine and one real model per session, compiled once."""

from __future__ import annotations

import pytest

from foresight_lab.engine.kv_cache import EngineConfig
from foresight_lab.lab import Lab
from tests.tiny import tiny_loaded_model

# Small limits keep the number of shapes (so compilations) low.
TINY_ENGINE = EngineConfig(max_slots=8, max_cache_length=256, prefill_chunk=64, min_cache_bucket=64)


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
