"""The jitted functions the scheduler calls: prefill, copy a row, decode one step.

Each is compiled once per shape bucket (batch rows, prompt chunk, attended cache
length), at warm-up, and the engine keeps the executables (`Precompiled`); sampling
parameters, seeds and positions are traced arrays. The cache is donated, so XLA
updates it in place instead of copying it every token.

The decode state also keeps each slot's last sampled token on the device, so the
scheduler can dispatch the next step before it has read this one's tokens back.
"""

from __future__ import annotations

import functools
import threading
import warnings

import jax
import jax.numpy as jnp

from foresight_lab.engine.sampler import (
    Sampled,
    SamplingParams,
    row_keys,
    sample,
    sampling_distribution,
    token_logprobs,
    top_logprobs,
)
from foresight_lab.models import cpu_kernels
from foresight_lab.models.config import ModelConfig
from foresight_lab.models.decoder import (
    Cache,
    Decoder,
    cache_length,
    empty_cache,
    output_logits,
)
from foresight_lab.models.quantized import KERNEL_MAX_ROWS

# Positions a prompt's logprobs form logits for at once (see Steps._prompt_logprobs).
LOGPROB_ROWS = KERNEL_MAX_ROWS

# A decode row's input token that is the one its slot sampled in the previous step,
# still on the device (the scheduler has not read it back yet).
FROM_LAST_STEP = -1

# XLA's CPU backend hands an elementwise op or a reduction to its YNNPACK library only
# when the op holds at least 4096 elements, so the number of rows in a call would choose
# how a row's norms and its sampler's sums are computed: in different orders, with
# different roundings. SmolLM2's logprobs moved in a row decoded beside 7 or more others,
# and with top_p its token changed at times. Only YNNPACK's dots are kept: each row of
# their result does not depend on the others (prefill's shared calls rely on it).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def _jit(fun, **jit_options):
    """jax.jit with CPU_COMPILER_OPTIONS where the engine runs on CPU."""
    if jax.default_backend() == "cpu" and _xla_takes_cpu_options():
        jit_options["compiler_options"] = CPU_COMPILER_OPTIONS
    return jax.jit(fun, **jit_options)


@functools.cache
def _xla_takes_cpu_options() -> bool:
    """Whether this jaxlib's XLA knows CPU_COMPILER_OPTIONS (an experimental option that
    a later XLA may rename): without it the engine still runs, with a warning that a
    row's results may then depend on its batch."""
    try:
        jax.jit(jnp.negative, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except jax.errors.JaxRuntimeError as error:
        warnings.warn(
            f"this jaxlib's XLA refused {CPU_COMPILER_OPTIONS} ({error}); compiling without "
            "them, so a request's logprobs, and rarely its tokens, may differ with the "
            "batch it decodes in",
            stacklevel=3,
        )
        return False
    return True


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


class Precompiled:
    """A jitted function and the executables compiled ahead of time for it, one per
    shape of its arguments.

    A call whose arguments have a compiled shape runs that executable; any other runs
    the jitted function, which compiles on first use. Holding the executables here,
    not only in JAX's caches, lets a process that will trace nothing more clear those
    caches (`jax.clear_caches()`: the traced programs, their lowered modules and the
    jit dispatch tables) without losing a compiled shape.
    """

    def __init__(self, fun, **jit_options):
        self.jitted = _jit(fun, **jit_options)
        self._executables: dict[tuple, jax.stages.Compiled] = {}

    def compile(self, *args, **static) -> None:
        """Compiles for arguments like these (arrays or jax.ShapeDtypeStruct)."""
        key = _shape_key(args, static)
        if key not in self._executables:
            self._executables[key] = self.jitted.lower(*args, **static).compile()

    def __call__(self, *args, **static):
        executable = self._executables.get(_shape_key(args, static))
        if executable is None:
            return self.jitted(*args, **static)
        return executable(*args)


def _shape_key(args, static) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((leaf.shape, leaf.dtype) for leaf in leaves), tuple(sorted(static.items()))


class Steps:
    """The compiled model functions of one engine."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_dtype: str,  # the engine cache's (EngineConfig.kv_cache_dtype)
        cache_sharding=None,
        counts_sharding=None,
        tokens_sharding=None,
    ):
        # On a mesh XLA partitions the pure-JAX matmuls; the CPU kernel is one device's.
        self.model = Decoder(model_config, cpu_kernel=cache_sharding is None)
        self.cache_dtype = cache_dtype  # of the scratch caches, as the engine's
        # Decode attention on the CPU kernel reads only each row's visible positions.
        self.decode_reads_cache_in_place = (
            self.model.cpu_kernel and cpu_kernels.available() and jax.default_backend() == "cpu"
        )
        # On a mesh, pin the state's layout so every step returns what the next expects.
        self._cache_sharding = cache_sharding
        self._counts_sharding = counts_sharding
        self._tokens_sharding = tokens_sharding
        self.prefill = Precompiled(
            self._prefill, static_argnames="kv_length", donate_argnames="cache"
        )
        self.decode = Precompiled(
            self._decode,
            static_argnames="kv_length",
            donate_argnames=("cache", "counts", "last_tokens"),
        )
        self.copy_row = Precompiled(_copy_row, donate_argnames="cache")
        self.prompt_logprobs = Precompiled(self._prompt_logprobs)
        self.clear_counts = Precompiled(_clear_row, donate_argnames="counts")
        self.next_token_logits = _jit(self._next_token_logits)
        self.sampling_distribution = _jit(sampling_distribution)

    def _prefill(
        self,
        params,
        cache: Cache,
        tokens: jax.Array,  # Int['R P'], a prompt chunk a row
        positions: jax.Array,  # Int['R P'], padding at >= cache length
        rows: jax.Array,  # Int['R'], the slot each row is written to
        kv_length: int,
    ) -> tuple[Cache, jax.Array]:
        """The cache with the chunk written, and the chunk's final hidden states,
        Float['R P E'], for `prompt_logprobs` (a prompt that asks for its logprobs)."""
        hidden, cache = self.model.apply(
            {"params": params}, tokens, positions, cache, rows, kv_length, return_logits=False
        )
        return self._pin_cache(cache), hidden

    def _pin_cache(self, cache: Cache) -> Cache:
        if self._cache_sharding is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, self._cache_sharding)

    def _prompt_logprobs(
        self,
        params,
        hidden: jax.Array,  # Float['1 P E'], a prefilled chunk's final hidden states
        targets: jax.Array,  # Int['1 P'], the token that follows each one
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Each target's logprob, Float['1 P'], and the top alternatives, Int['1 P K'] and
        Float['1 P K'] (echo with logprobs). Apart from prefill, which every prompt runs,
        so that a prompt's logprobs add only this small function to the compiled shapes,
        not a second copy of the model.

        The logits are formed LOGPROB_ROWS positions at a time, in a loop: few enough for
        the CPU kernel, which reads the output layer in its blocks. All at once, a
        512-token chunk's took 204 MB of temporaries with SmolLM2: its [P, V] logits, and
        the whole embedding dequantized to float32 (108 MB) for the dot."""
        _, length, width = hidden.shape
        block = min(LOGPROB_ROWS, length)
        pad = -length % block
        hidden = jnp.pad(hidden[0], ((0, pad), (0, 0))).reshape(-1, block, width)
        targets = jnp.pad(targets[0], (0, pad)).reshape(-1, block)

        def one_block(inputs):  # Float['block E'], Int['block']
            logits = output_logits(self.model, params, inputs[0])
            top_tokens, top_values = top_logprobs(logits)
            return token_logprobs(logits, inputs[1]), top_tokens, top_values

        per_block = jax.lax.map(one_block, (hidden, targets))
        return tuple(a.reshape(1, -1, *a.shape[2:])[:, :length] for a in per_block)

    def _next_token_logits(
        self,
        params,
        tokens: jax.Array,  # Int['1 P'], padding at positions >= P
        positions: jax.Array,  # Int['1 P']
        last: jax.Array,  # Int[], index of the prompt's last token
    ) -> jax.Array:
        """Logits after a prompt, Float['V'], on a scratch cache (the engine's is untouched);
        only the last position's go through the output layer."""
        length = tokens.shape[1]
        scratch = empty_cache(self.model.config, 1, length, self.cache_dtype)
        hidden, _ = self.model.apply(
            {"params": params}, tokens, positions, scratch, None, length, return_logits=False
        )
        return output_logits(self.model, params, hidden[0, last][None])[0]

    def _decode(
        self,
        params,
        cache: Cache,
        counts: jax.Array,  # Int['slots V'], tokens generated so far per slot
        last_tokens: jax.Array,  # Int['slots'], each slot's token sampled by its last step
        tokens: jax.Array,  # Int['B'], each row's input; FROM_LAST_STEP takes last_tokens'
        positions: jax.Array,  # Int['B'], where that token sits; idle rows at >= cache length
        sampling: SamplingParams,
        seeds: jax.Array,  # UInt32['B 2']
        choices: jax.Array,  # Int['B']
        kv_length: int,
    ) -> tuple[Sampled, Cache, jax.Array, jax.Array]:
        rows = tokens.shape[0]
        tokens = jnp.where(tokens == FROM_LAST_STEP, last_tokens[:rows], tokens)
        logits, cache = self.model.apply(
            {"params": params}, tokens[:, None], positions[:, None], cache, None, kv_length
        )
        # The key of a sampled token is folded with the position it will occupy.
        keys = row_keys(seeds, choices, positions + 1)
        sampled = sample(logits[:, 0], sampling, keys, counts[:rows])
        # Only rows with a sequence count and remember their token: an idle row's slot
        # may belong to a sequence that skips this step, or to no one.
        real = positions < cache_length(cache)
        counts = counts.at[jnp.arange(rows), sampled.tokens].add(real.astype(counts.dtype))
        last_tokens = last_tokens.at[:rows].set(jnp.where(real, sampled.tokens, last_tokens[:rows]))
        if self._counts_sharding is not None:
            counts = jax.lax.with_sharding_constraint(counts, self._counts_sharding)
            last_tokens = jax.lax.with_sharding_constraint(last_tokens, self._tokens_sharding)
        return sampled, self._pin_cache(cache), counts, last_tokens


def _copy_row(cache: Cache, source: jax.Array, target: jax.Array) -> Cache:
    """Copies one slot's keys and values to another (n choices share a prompt)."""

    def copy(array):  # Float['L slots Hkv S D']
        row = jax.lax.dynamic_slice_in_dim(array, source, 1, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(array, row, target, axis=1)

    return jax.tree.map(copy, cache)


def _clear_row(counts: jax.Array, slot: jax.Array) -> jax.Array:
    """Zeroes one slot's generated-token counts, Int['slots V'], for a new sequence."""
    return jax.lax.dynamic_update_slice_in_dim(
        counts, jnp.zeros((1, counts.shape[1]), counts.dtype), slot, 0
    )
