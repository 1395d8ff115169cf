"""The KV cache's size and the shape buckets every compiled function is built for.

The cache is allocated once: `max_slots` rows by `max_cache_length` positions,
keys and values for every layer. Calls read only a bucketed prefix of it, so a short
conversation does not pay for the longest one, and the set of shapes (so of
compilations) stays small and known.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from foresight_lab.models import cpu_kernels
from foresight_lab.models.config import ModelConfig
from foresight_lab.models.decoder import Cache, cache_shape, empty_cache
from foresight_lab.models.quantized import ACTIVATION_BITS

# The cache's element types: float16 (llama.cpp's default too) halves the cache's
# memory; float32 keeps keys and values exactly as computed.
KV_CACHE_DTYPES = ("float16", "float32")


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    sizes, size = [], low
    while size < high:
        sizes.append(size)
        size *= 2
    return (*sizes, high)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Limits of the engine; they fix the KV cache budget and the compiled shapes."""

    max_slots: int = 8  # sequences decoded together (each `n` choice takes one)
    max_cache_length: int = 2048  # prompt plus completion tokens per sequence
    prefill_chunk: int = 512  # longest prompt piece prefilled in one call
    min_cache_bucket: int = 128
    min_prefill_bucket: int = 16
    max_queue: int = 256  # requests waiting for slots before submit() refuses more
    # Keys and values are stored as this; attention computes in float32 either way.
    kv_cache_dtype: str = "float16"
    # The CPU kernel rounds each block of 32 inputs of a q4_1 matmul to this many bits:
    # 8 (llama.cpp's rounding) makes decode faster and less exact (see lab.load).
    activation_bits: int = 16

    def __post_init__(self):
        if self.max_slots < 1 or self.max_cache_length < 2:
            raise ValueError("max_slots must be >= 1 and max_cache_length >= 2")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"not {self.kv_cache_dtype!r}"
            )
        if self.activation_bits not in ACTIVATION_BITS:
            raise ValueError(
                f"activation_bits must be one of {', '.join(map(str, ACTIVATION_BITS))}, "
                f"not {self.activation_bits!r}"
            )
        if self.prefill_chunk > self.max_cache_length:
            object.__setattr__(self, "prefill_chunk", self.max_cache_length)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(1, self.max_slots)

    @property
    def cache_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(
            min(self.min_cache_bucket, self.max_cache_length), self.max_cache_length
        )

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        return _powers_of_two(min(self.min_prefill_bucket, self.prefill_chunk), self.prefill_chunk)

    def cache_bytes(self, model: ModelConfig) -> int:
        per_layer = 2 * self.max_slots * self.max_cache_length * model.num_kv_heads * model.head_dim
        return per_layer * model.num_layers * jnp.dtype(self.kv_cache_dtype).itemsize


def bucket(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size`."""
    for b in buckets:
        if b >= size:
            return b
    raise ValueError(f"{size} exceeds the largest bucket {buckets[-1]}")


class CacheBudgetError(ValueError):
    """The configured KV cache does not fit in the device's free memory."""


def free_memory_bytes(device: jax.Device) -> int | None:
    """Free memory of a device: its allocator's view on GPU/TPU, the OS's on CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_budget(model: ModelConfig, config: EngineConfig, devices: int = 1) -> None:
    """Refuses, with what to change, a cache that would not fit (instead of crashing)."""
    needed = config.cache_bytes(model) // devices
    free = free_memory_bytes(jax.devices()[0])
    if free is not None and needed > 0.9 * free:
        raise CacheBudgetError(
            f"the KV cache for max_slots={config.max_slots} x max_cache_length="
            f"{config.max_cache_length} needs {needed / 2**30:.1f} GiB per device, but only "
            f"{free / 2**30:.1f} GiB is free; lower max_slots or max_cache_length"
        )


def allocate(model: ModelConfig, config: EngineConfig) -> Cache:
    """The engine's KV cache, zeroed. On the CPU, with the kernels built, the OS holds a
    page of it only once a position in that page is written (`kernels/zeros.cc`): the
    budget is what the cache may grow to, and a server's memory follows what its
    sequences hold. Elsewhere it is written with zeros, all of it at once."""
    return _allocate(model, config.max_slots, config.max_cache_length, config.kv_cache_dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _allocate(model: ModelConfig, slots: int, length: int, dtype: str) -> Cache:
    def kernel():
        result = jax.ShapeDtypeStruct(cache_shape(model, slots, length), dtype)
        return tuple(jax.ffi.ffi_call(cpu_kernels.ZEROS, (result, result))())

    return cpu_kernels.call_or_reference(
        True, kernel, lambda: empty_cache(model, slots, length, dtype)
    )
