"""The jitted functions the scheduler calls: prefill, copy a row, decode one step.

Each is compiled once per shape bucket (batch rows, prompt chunk, attended cache
length); sampling parameters, seeds and positions are traced arrays. The cache is
donated, so XLA updates it in place instead of copying it every token.
"""

from __future__ import annotations

import threading

import jax

from foresight_lab.engine.sampler import Sampled, SamplingParams, row_keys, sample
from foresight_lab.models.config import ModelConfig
from foresight_lab.models.decoder import Decoder, LayerCache

Cache = tuple[LayerCache, ...]

# Backend compilations are counted per thread that runs engine code, so an engine can
# report its own count (JAX compiles on the thread that first calls a new shape).
_compiles = threading.local()
_listening = False


def _on_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration" and getattr(
        _compiles, "counter", None
    ):
        _compiles.counter[0] += 1


def _listen() -> None:
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening = True


class CompileCounter:
    """Counts backend compilations made inside `with counter:` on the current thread."""

    def __init__(self):
        _listen()
        self.count = [0]

    def __enter__(self):
        self._previous = getattr(_compiles, "counter", None)
        _compiles.counter = self.count
        return self

    def __exit__(self, *exc):
        _compiles.counter = self._previous

    @property
    def value(self) -> int:
        return self.count[0]


class Steps:
    """The compiled model functions of one engine."""

    def __init__(self, model_config: ModelConfig):
        self.model = Decoder(model_config)
        self.prefill = jax.jit(self._prefill, static_argnames="kv_length", donate_argnames="cache")
        self.decode = jax.jit(self._decode, static_argnames="kv_length", donate_argnames="cache")
        self.copy_row = jax.jit(_copy_row, donate_argnames="cache")

    def _prefill(
        self,
        params,
        cache: Cache,
        tokens: jax.Array,  # Int['1 P']
        positions: jax.Array,  # Int['1 P'], padding at >= cache length
        slot: jax.Array,  # Int[]
        kv_length: int,
    ) -> Cache:
        _, cache = self.model.apply(
            {"params": params}, tokens, positions, cache, slot, kv_length, return_logits=False
        )
        return cache

    def _decode(
        self,
        params,
        cache: Cache,
        tokens: jax.Array,  # Int['B'], the last token of each row
        positions: jax.Array,  # Int['B'], where that token sits; idle rows at >= cache length
        sampling: SamplingParams,
        seeds: jax.Array,  # UInt32['B 2']
        choices: jax.Array,  # Int['B']
        kv_length: int,
    ) -> tuple[Sampled, Cache]:
        logits, cache = self.model.apply(
            {"params": params}, tokens[:, None], positions[:, None], cache, 0, kv_length
        )
        # The key of a sampled token is folded with the position it will occupy.
        keys = row_keys(seeds, choices, positions + 1)
        return sample(logits[:, 0], sampling, keys), cache


def _copy_row(cache: Cache, source: jax.Array, target: jax.Array) -> Cache:
    """Copies one slot's keys and values to another (n choices share a prompt)."""

    def copy(array):
        row = jax.lax.dynamic_slice_in_dim(array, source, 1)
        return jax.lax.dynamic_update_slice_in_dim(array, row, target, 0)

    return jax.tree.map(copy, cache)
