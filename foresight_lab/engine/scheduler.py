"""The scheduler: one thread that owns the KV cache and batches every live sequence.

    submit() ─► waiting ─► admit: prefill prompt[:-1] into a free slot (prompts that
                            wait together share a call, a row each), copy it to
                            the slots of the other n choices
                        ─► dispatch a decode step over the occupied prefix of slots
                        ─► read the previous step back; per sequence: detokenize,
                            match stops, EOS, max_tokens
                        ─► Delta events on the request's queue; finished slots freed

Each sequence enters decoding with its last prompt token as input, so the first
generated token is sampled by the same decode step, with the same per-row key
scheme, as every later one. Slots are taken lowest-first so the occupied rows stay a
short prefix and the decode step runs at the smallest batch bucket that covers them.

Decode is pipelined one step deep: step N+1 is dispatched, taking step N's tokens
from the device, before step N's tokens are read back, so the host's per-token work
(reading back, detokenizing, streaming) overlaps the device's next step. A sequence
that step N finishes has already been given step N+1; that step's token for it is
dropped, and what it wrote (one cache entry past the sequence's end, one count) is
invisible to the slot's next sequence, which attends only to its own positions and
starts from cleared counts. Tokens are unchanged by the pipelining: a row's key
depends on its seed, choice and position, not on the step that samples it.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from foresight_lab.engine import heap
from foresight_lab.engine.handle import DONE, EngineError, RequestHandle
from foresight_lab.engine.kv_cache import EngineConfig, allocate, bucket, check_budget
from foresight_lab.engine.request import (
    Delta,
    InvalidRequestError,
    QueueFullError,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)
from foresight_lab.engine.sampler import Sampled, SamplingParams
from foresight_lab.engine.sharding import cache_spec, shard_params
from foresight_lab.engine.step import FROM_LAST_STEP, CompileCounter, Steps
from foresight_lab.engine.text import CompletionText
from foresight_lab.models.config import ModelConfig
from foresight_lab.models.quantized import kernel_serves, with_activation_bits


def _alternatives(options: SamplingOptions) -> int:
    """How many top alternatives a sequence reports with each token (0: none); the
    decode step computes them only when some row's count is above 0."""
    return options.top_logprobs if options.logprobs else 0


def _sampling_params(
    rows: int, options: dict[int, SamplingOptions], vocab_size: int
) -> SamplingParams:
    """Sampling parameters of `rows` rows, numpy arrays of shape [rows]: row i samples
    as options[i] says; a row without options is idle (greedy, nothing cut, no penalty,
    no alternatives)."""
    fields = {
        "temperature": np.zeros(rows, np.float32),
        "top_p": np.ones(rows, np.float32),
        "top_k": np.zeros(rows, np.int32),
        "min_p": np.zeros(rows, np.float32),
        "presence_penalty": np.zeros(rows, np.float32),
        "frequency_penalty": np.zeros(rows, np.float32),
        "top_logprobs": np.zeros(rows, np.int32),
    }
    for row, o in options.items():
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
            fields[name][row] = getattr(o, name)
        # top_k beyond the vocabulary keeps everything, which is what 0 means.
        fields["top_k"][row] = o.top_k if o.top_k < vocab_size else 0
        fields["top_logprobs"][row] = _alternatives(o)
    return SamplingParams(**fields)


@dataclasses.dataclass
class _Sequence:
    """One choice of one request, decoding in one slot."""

    handle: RequestHandle
    index: int
    slot: int
    token: int  # the next decode step's input, or FROM_LAST_STEP (still on the device)
    position: int  # where that token sits
    text: CompletionText
    dispatched: int = 0  # decode steps dispatched for it, read back or not
    generated: int = 0  # tokens read back and emitted


@dataclasses.dataclass
class _InFlight:
    """A dispatched decode step whose tokens have not been read back yet."""

    sampled: Sampled
    sequences: list[_Sequence]


@dataclasses.dataclass
class _Prefill:
    """A request whose prompt is being written into its first slot, one chunk per step."""

    handle: RequestHandle
    slots: list[int]
    chunks: deque  # (start, padded size, attended cache length) still to run
    logprobs: list | None  # prompt logprobs gathered so far, when asked


_RESERVED = "reserved"  # a slot held by a request that is still prefilling


class Scheduler:
    def __init__(
        self,
        model_config: ModelConfig,
        params,
        tokenizer,
        eos_token_ids: set[int],
        config: EngineConfig,
        mesh: Mesh | None = None,
    ):
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.mesh = mesh
        check_budget(model_config, config, devices=1 if mesh is None else mesh.size)
        params = with_activation_bits(params, config.activation_bits)
        if mesh is None:
            self.params = jax.device_put(params)
            self._cache_sharding = self._counts_sharding = self._tokens_sharding = None
        else:
            self.params = shard_params(params, model_config, mesh)
            self._cache_sharding = NamedSharding(
                mesh, cache_spec(model_config, config.max_slots, mesh)
            )
            slots_axis = self._cache_sharding.spec[1]
            self._counts_sharding = NamedSharding(mesh, P(slots_axis, None))
            self._tokens_sharding = NamedSharding(mesh, P(slots_axis))
        self._allocate_state()
        self.steps = Steps(
            model_config,
            config.kv_cache_dtype,
            self._cache_sharding,
            self._counts_sharding,
            self._tokens_sharding,
        )
        # A decode step whose attention reads each row's visible positions in place (the
        # CPU kernel) costs the same for any window, so one cache bucket serves it.
        self.decode_cache_buckets = (
            (config.max_cache_length,)
            if self.steps.decode_reads_cache_in_place
            else config.cache_buckets
        )
        self.compiles = CompileCounter()
        self._waiting: deque[RequestHandle] = deque()
        self._slots: list[_Sequence | str | None] = [None] * config.max_slots
        self._prefilling: deque[_Prefill] = deque()
        self._in_flight: _InFlight | None = None
        self._wake = threading.Condition()
        self._device = threading.Lock()  # the cache is donated: one user at a time
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- the caller's side -------------------------------------------------------

    def submit(self, prompt_ids: list[int], options: SamplingOptions) -> RequestHandle:
        limit = self.config.max_cache_length
        if not prompt_ids:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(
                f"prompt: {len(prompt_ids)} tokens do not fit the context of {limit} tokens "
                "(the prompt plus at least one generated token); shorten the prompt",
                "prompt",
            )
        max_tokens = options.max_tokens or limit - len(prompt_ids)
        if len(prompt_ids) + max_tokens > limit:
            raise InvalidRequestError(
                f"max_tokens: the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the context of {limit} tokens; ask for at most "
                f"{limit - len(prompt_ids)} tokens",
                "max_tokens",
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= token < vocab for token in prompt_ids):
            raise InvalidRequestError(
                f"prompt: token ids must be between 0 and {vocab - 1} (the vocabulary size is {vocab})",
                "prompt",
            )
        if options.n > self.config.max_slots:
            raise InvalidRequestError(
                f"n: {options.n} choices exceed this engine's {self.config.max_slots} slots",
                "n",
            )
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        handle = RequestHandle(list(prompt_ids), options, seed, max_tokens)
        with self._wake:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"the engine's queue is full ({self.config.max_queue} requests waiting); "
                    "retry shortly"
                )
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._run, name="foresight-engine", daemon=True
                )
                self._thread.start()
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_slots(self) -> int:
        """Slots in use: decoding, or reserved by a request whose prompt is prefilling."""
        return sum(s is not None for s in self._slots)

    def _decoding(self) -> list[_Sequence]:
        return [s for s in self._slots if isinstance(s, _Sequence)]

    # ---- warm-up -----------------------------------------------------------------

    def _prefill_plan(self, length: int) -> list[tuple[int, int, int]]:
        """(start, padded size, attended cache length) of each chunk of a `length`-token prefill."""
        c = self.config
        plan = []
        for start in range(0, length, c.prefill_chunk):
            real = min(c.prefill_chunk, length - start)
            size = bucket(real, c.prefill_buckets) if start == 0 else c.prefill_chunk
            kv_length = bucket(min(start + size, c.max_cache_length), c.cache_buckets)
            plan.append((start, size, kv_length))
        return plan

    def _can_share(self, rows: int, width: int, size: int) -> bool:
        """Whether a prompt chunk padded to `size` tokens may be prefilled as one of `rows`
        rows of `width` tokens: the call stays within a prompt chunk's tokens, and its
        matmuls take the path the chunk would take alone (the CPU kernel or the dot),
        so the chunk's keys and values, and the tokens that follow, are the same."""
        tokens = rows * width
        return tokens <= self.config.prefill_chunk and kernel_serves(tokens) == kernel_serves(size)

    def shapes(self) -> list[tuple[str, int, int, int]]:
        """Every (function, rows, tokens a row, attended cache length) that can run;
        prompt_logprobs reads no cache (length 0)."""
        c = self.config
        chunks = {chunk for n in range(1, c.max_cache_length) for chunk in self._prefill_plan(n)}
        alone = {(1, size, kv) for _, size, kv in chunks}
        shared = {
            (rows, size, kv)
            for start, size, kv in chunks
            if start == 0
            for rows in c.batch_buckets
            if rows > 1 and self._can_share(rows, size, size)
        }
        decode = {(b, 1, kv) for b in c.batch_buckets for kv in self.decode_cache_buckets}
        # Decode first: compiling a decode step takes 90 to 130 MB more while it runs
        # (SmolLM2), a prefill 30 to 50, and each compiled shape stays resident, so the
        # largest come while the least is held.
        return [
            *(("decode", *shape) for shape in sorted(decode)),
            *(("prefill", *shape) for shape in sorted(alone | shared)),
            *(("prompt_logprobs", 1, size, 0) for size in sorted({size for _, size, _ in alone})),
        ]

    def compile_shape(self, kind: str, rows: int, size: int, kv_length: int) -> None:
        """Compiles one shape ahead of time, on arguments like a real call's, without
        running it: running a prompt's logprobs at the longest chunk took about 400 MB
        of temporaries, more than any compilation, and running every shape took time."""
        idle = np.full((rows, size), self.config.max_cache_length, np.int32)
        zeros = np.zeros((rows, size), np.int32)
        slots = np.zeros(rows, np.int32)
        s = self.steps
        with self._device, self.compiles:
            if kind == "prefill":
                args = (self.params, self.cache, zeros, idle, slots)
                s.prefill.compile(*args, kv_length=kv_length)
                s.copy_row.compile(self.cache, np.int32(0), np.int32(0))
                s.clear_counts.compile(self.counts, np.int32(0))
            elif kind == "prompt_logprobs":
                hidden = jax.ShapeDtypeStruct(
                    (rows, size, self.model_config.hidden_size), jnp.float32
                )
                s.prompt_logprobs.compile(self.params, hidden, zeros)
            else:
                args = (self.params, self.cache, self.counts, self.last_tokens)
                inputs = self._decode_inputs([], rows)
                s.decode.compile(*args, *inputs, kv_length=kv_length)

    def next_token_distribution(self, prompt_ids: list[int], options: SamplingOptions):
        """(model probabilities, sampling probabilities), each Float['V'] as numpy, of the
        token after `prompt_ids`; runs beside the scheduler on a scratch cache."""
        c = self.config
        if not prompt_ids or len(prompt_ids) > c.max_cache_length:
            raise InvalidRequestError(
                f"prompt: must have 1 to {c.max_cache_length} tokens, got {len(prompt_ids)}",
                "prompt",
            )
        size = bucket(len(prompt_ids), tuple(sorted({*c.prefill_buckets, *c.cache_buckets})))
        tokens = np.zeros((1, size), np.int32)
        tokens[0, : len(prompt_ids)] = prompt_ids
        positions = np.full((1, size), size, np.int32)
        positions[0, : len(prompt_ids)] = np.arange(len(prompt_ids))
        params = _sampling_params(1, {0: options}, self.model_config.vocab_size)
        with self.compiles:
            logits = self.steps.next_token_logits(
                self.params, tokens, positions, np.int32(len(prompt_ids) - 1)
            )
            sampling = self.steps.sampling_distribution(logits[None], params)[0]
            model = jax.nn.softmax(logits)
        return np.asarray(model), np.asarray(sampling)

    # ---- the scheduler thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                idle = not self._has_work()
            if idle:
                # What the last requests' calls freed goes back to the OS before the
                # engine waits, outside the lock so that submit() is not held up.
                heap.return_freed_memory()
            with self._wake:
                while not self._has_work():
                    self._wake.wait()
                if self._stopping:
                    self._fail_all(EngineError("the engine was stopped"))
                    return
            try:
                with self._device, self.compiles:
                    self._drop_cancelled()
                    self._admit()
                    # One prefill call (a chunk of tokens), then one decode step: a long
                    # prompt delays the running streams by a chunk at a time, not by its
                    # whole prefill.
                    if self._prefilling:
                        self._prefill_next_chunk()
                    previous, self._in_flight = self._in_flight, self._dispatch_decode()
                    if previous is not None:
                        self._read_back(previous)
            except Exception as error:  # never let one failure kill the engine
                self._fail_all(error)

    def _has_work(self) -> bool:
        return bool(self._stopping or self._waiting or self.active_slots or self._in_flight)

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    def _admit(self) -> None:
        """Moves waiting requests, first come first served, into free slots to prefill."""
        while True:
            with self._wake:
                if not self._waiting:
                    return
                handle = self._waiting[0]
                if handle.cancelled.is_set():
                    self._waiting.popleft()
                    handle.put(DONE)
                    continue
                free = self._free_slots()
                if len(free) < handle.options.n:
                    return  # the head waits for slots; nobody overtakes it
                self._waiting.popleft()
            slots = free[: handle.options.n]
            for slot in slots:
                self._slots[slot] = _RESERVED
            logprobs = None if handle.options.prompt_logprobs is None else [None]
            chunks = deque(self._prefill_plan(len(handle.prompt_ids) - 1))
            self._prefilling.append(_Prefill(handle, slots, chunks, logprobs))

    def _prefill_next_chunk(self) -> None:
        """Runs the next chunk of the oldest prefilling prompt, with the prompts behind it
        that can share the call; a prompt with no chunks left starts decoding."""
        if self._prefilling[0].chunks:
            self._prefill_chunk(self._sharing_call())
        for job in [j for j in self._prefilling if not j.chunks]:
            self._prefilling.remove(job)
            self._start_decoding(job)

    def _sharing_call(self) -> list[_Prefill]:
        """The oldest prefilling prompt and, when it is a first chunk, the first chunks
        behind it that may join it as rows of one call (`_can_share`, the same attended
        length): a burst of short prompts is prefilled in a few calls, not one each."""
        head, *others = self._prefilling
        start, size, kv_length = head.chunks[0]
        if start != 0 or head.logprobs is not None:
            return [head]
        jobs, sizes = [head], [size]
        for job in others:
            if not job.chunks or job.logprobs is not None:
                continue
            start, size, kv = job.chunks[0]
            rows, width = bucket(len(jobs) + 1, self.config.batch_buckets), max(*sizes, size)
            fits = all(self._can_share(rows, width, s) for s in (*sizes, size))
            if start == 0 and kv == kv_length and fits:
                jobs.append(job)
                sizes.append(size)
        return jobs

    def _prefill_chunk(self, jobs: list[_Prefill]) -> None:
        """Writes the next chunk of each job's prompt (all of it but its last token) into
        the job's first slot: one call, a row a job, padded to the widest chunk and to a
        rows bucket (padding rows write nothing)."""
        chunks = [job.chunks.popleft() for job in jobs]
        width, kv_length = max(size for _, size, _ in chunks), chunks[0][2]
        rows = bucket(len(jobs), self.config.batch_buckets)
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), self.config.max_cache_length, np.int32)
        slots = np.full(rows, jobs[0].slots[0], np.int32)
        pieces = []
        for row, (job, (start, size, _)) in enumerate(zip(jobs, chunks, strict=True)):
            pieces.append(piece := job.handle.prompt_ids[:-1][start : start + size])
            tokens[row, : len(piece)] = piece
            positions[row, : len(piece)] = np.arange(start, start + len(piece))
            slots[row] = job.slots[0]
        self.cache, hidden = self.steps.prefill(
            self.params, self.cache, tokens, positions, slots, kv_length=kv_length
        )
        if jobs[0].logprobs is None:
            return
        # A prompt that wants its logprobs is prefilled alone (`_sharing_call`).
        [job], [(start, _, _)], [piece] = jobs, chunks, pieces
        following = job.handle.prompt_ids[start + 1 : start + 1 + len(piece)]
        targets = np.zeros((1, width), np.int32)
        targets[0, : len(following)] = following
        chosen, top_tokens, top_values = self.steps.prompt_logprobs(self.params, hidden, targets)
        chosen, top_tokens, top_values = map(np.asarray, (chosen, top_tokens, top_values))
        k = job.handle.options.prompt_logprobs
        job.logprobs.extend(
            self._token_logprob(token, chosen[0, i], top_tokens[0, i], top_values[0, i], k)
            for i, token in enumerate(following)
        )

    def _start_decoding(self, job: _Prefill) -> None:
        """Copies the prompt to the other choices' slots and makes every slot a sequence."""
        handle, first = job.handle, job.slots[0]
        handle.prompt_logprobs = job.logprobs
        for slot in job.slots[1:]:
            self.cache = self.steps.copy_row(self.cache, np.int32(first), np.int32(slot))
        for index, slot in enumerate(job.slots):
            self.counts = self.steps.clear_counts(self.counts, np.int32(slot))
            self._slots[slot] = _Sequence(
                handle=handle,
                index=index,
                slot=slot,
                token=handle.prompt_ids[-1],
                position=len(handle.prompt_ids) - 1,
                text=CompletionText(self.tokenizer, handle.options.stop),
            )

    def _token_logprob(self, token: int, logprob, top_tokens, top_values, k: int) -> TokenLogprob:
        top = tuple(
            TopLogprob(self._token_text(t), int(t), float(v))
            for t, v in zip(top_tokens[:k], top_values[:k], strict=True)
        )
        return TokenLogprob(self._token_text(token), int(token), float(logprob), top)

    def _decode_inputs(self, sequences: list[_Sequence], rows: int):
        idle = self.config.max_cache_length
        tokens = np.zeros(rows, np.int32)
        positions = np.full(rows, idle, np.int32)
        seeds = np.zeros((rows, 2), np.uint32)
        choices = np.zeros(rows, np.int32)
        for s in sequences:
            tokens[s.slot], positions[s.slot] = s.token, s.position
            seed = s.handle.seed % 2**64
            seeds[s.slot] = (seed >> 32, seed & 0xFFFFFFFF)
            choices[s.slot] = s.index
        options = {s.slot: s.handle.options for s in sequences}
        sampling = _sampling_params(rows, options, self.model_config.vocab_size)
        return tokens, positions, sampling, seeds, choices

    def _dispatch_decode(self) -> _InFlight | None:
        """Dispatches one decode step for every sequence that still needs tokens."""
        live = [s for s in self._decoding() if s.dispatched < s.handle.max_tokens]
        if not live:
            return None
        rows = bucket(max(s.slot for s in live) + 1, self.config.batch_buckets)
        kv_length = bucket(max(s.position for s in live) + 1, self.decode_cache_buckets)
        sampled, self.cache, self.counts, self.last_tokens = self.steps.decode(
            self.params,
            self.cache,
            self.counts,
            self.last_tokens,
            *self._decode_inputs(live, rows),
            kv_length=kv_length,
        )
        for s in live:
            s.token, s.position = FROM_LAST_STEP, s.position + 1
            s.dispatched += 1
        return _InFlight(sampled, live)

    def _read_back(self, step: _InFlight) -> None:
        """Emits a step's tokens to the sequences that are still running."""
        tokens = np.asarray(step.sampled.tokens)
        logprobs = np.asarray(step.sampled.logprobs)
        wants_top = any(_alternatives(s.handle.options) for s in step.sequences)
        top_tokens = np.asarray(step.sampled.top_tokens) if wants_top else None
        top_logprobs = np.asarray(step.sampled.top_logprobs) if wants_top else None
        for s in step.sequences:
            if self._slots[s.slot] is not s:
                continue  # finished by the step before, or cancelled, while this one ran
            token = int(tokens[s.slot])
            s.generated += 1
            finish = None
            if token in self.eos_token_ids and not s.handle.options.ignore_eos:
                text, finish = s.text.finish(), "stop"
            else:
                text, stopped = s.text.push(token)
                if stopped:
                    finish = "stop"
                elif s.generated >= s.handle.max_tokens:
                    text, finish = text + s.text.finish(), "length"
            logprob = None
            if s.handle.options.logprobs:
                k = _alternatives(s.handle.options)
                alternatives = (top_tokens[s.slot], top_logprobs[s.slot]) if k else ((), ())
                logprob = (self._token_logprob(token, logprobs[s.slot], *alternatives, k),)
            s.handle.put(Delta(s.index, text, (token,), logprob, finish))
            if finish:
                self._finish(s)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _finish(self, sequence: _Sequence) -> None:
        self._slots[sequence.slot] = None
        if not any(s.handle is sequence.handle for s in self._decoding()):
            sequence.handle.put(DONE)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._prefilling if j.handle.cancelled.is_set()]:
            self._prefilling.remove(job)
            for slot in job.slots:
                self._slots[slot] = None
            job.handle.put(DONE)
        for s in self._decoding():
            if s.handle.cancelled.is_set():
                s.handle.put(Delta(s.index, "", (), None, "cancelled"))
                self._finish(s)

    def _fail_all(self, error: BaseException) -> None:
        handles = {id(s.handle): s.handle for s in self._decoding()}
        handles.update({id(job.handle): job.handle for job in self._prefilling})
        self._prefilling.clear()
        self._in_flight = None
        with self._wake:
            handles.update({id(h): h for h in self._waiting})
            self._waiting.clear()
        self._slots = [None] * self.config.max_slots
        for handle in handles.values():
            handle.put(error)
        # A failed call may have consumed the donated cache: start from a fresh one.
        self._allocate_state()

    def _allocate_state(self) -> None:
        """The KV cache, the generated-token counts and each slot's last sampled token,
        placed on the mesh if there is one."""
        self.cache = allocate(self.model_config, self.config)
        self.counts = self._zero_counts()
        self.last_tokens = jnp.zeros(self.config.max_slots, jnp.int32)
        if self.mesh is not None:
            self.cache = jax.device_put(self.cache, self._cache_sharding)
            self.last_tokens = jax.device_put(self.last_tokens, self._tokens_sharding)

    def _zero_counts(self) -> jax.Array:
        """Int['slots V'] zeros, laid out as the engine's generated-token counts."""
        counts = jnp.zeros((self.config.max_slots, self.model_config.vocab_size), jnp.int32)
        return counts if self.mesh is None else jax.device_put(counts, self._counts_sharding)
