"""A stand-in for the engine, to test the server without a model (JetStream's idea).

It keeps the engine's narrow interface exactly (`submit` checks what the engine checks
and returns the engine's own `RequestHandle`; events are `Delta`s, finish reasons
"stop", "length" and "cancelled"; `active_slots`), and makes its tokens up: one byte
per token, drawn from a small alphabet by the seed, so texts are easy to predict.

    engine = MockEngine(max_slots=4, max_cache_length=128, token_delay=0.01)
    engine.fail_on_submit = RuntimeError("boom")   # submit raises (a 500, not the client's fault)
    engine.fail_after = 3                          # generation fails after 3 tokens
"""

from __future__ import annotations

import dataclasses
import random
import secrets
import threading
import time

from foresight_lab.engine.handle import DONE, RequestHandle
from foresight_lab.engine.request import (
    Delta,
    InvalidRequestError,
    QueueFullError,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)

ALPHABET = "abcdefgh "
ROLES = ("system", "developer", "user", "assistant", "tool")


class ByteTokenizer:
    """One token per byte (ids 0 to 255); 256 is end-of-sequence."""

    eos_token_id = 256

    def __init__(self, chat_template: bool = True):
        self.chat_template = "<role>content\\n per message" if chat_template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", "replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        for m in messages:  # as a real template's raise_exception would
            if m["role"] not in ROLES:
                raise ValueError(f"unknown role {m['role']!r}")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclasses.dataclass
class MockModelConfig:
    vocab_size: int = 257


@dataclasses.dataclass
class MockModel:
    name: str
    tokenizer: ByteTokenizer
    config: MockModelConfig = dataclasses.field(default_factory=MockModelConfig)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template


@dataclasses.dataclass
class MockEngineConfig:
    max_slots: int = 4
    max_cache_length: int = 128
    max_queue: int = 64


def expected_token(prompt_ids, options: SamplingOptions, seed: int, choice: int, step: int) -> str:
    """The mock's token: greedy depends on the prompt and position only; sampling also
    on the seed and the choice index."""
    if options.temperature == 0:
        return ALPHABET[(sum(prompt_ids) + step) % len(ALPHABET)]
    draw = random.Random(f"{seed}/{choice}/{step}/{sum(prompt_ids)}")
    return draw.choice(ALPHABET)


def expected_text(
    prompt: str | list[int], max_tokens: int, temperature: float, seed: int = 0, choice: int = 0
) -> str:
    """What the mock generates for one choice, when no stop string ends it first."""
    prompt_ids = list(prompt.encode()) if isinstance(prompt, str) else prompt
    options = SamplingOptions(max_tokens=max_tokens, temperature=temperature)
    return "".join(expected_token(prompt_ids, options, seed, choice, s) for s in range(max_tokens))


class MockEngine:
    def __init__(
        self,
        name: str = "mock-model",
        max_slots: int = 4,
        max_cache_length: int = 128,
        max_queue: int = 64,
        token_delay: float = 0.0,
        chat_template: bool = True,
    ):
        self.model = MockModel(name, ByteTokenizer(chat_template))
        self.tokenizer = self.model.tokenizer
        self.config = MockEngineConfig(max_slots, max_cache_length, max_queue)
        self.token_delay = token_delay
        self.fail_on_submit: Exception | None = None
        self.fail_after: int | None = None
        self.compile_count = 0  # nothing to compile; a test may set it, as /metrics reads it
        self.handles: list[RequestHandle] = []  # every request submitted, in order
        self.started: list[RequestHandle] = []  # those that got their slots
        self._slots = threading.Condition()
        self._active = 0
        self._waiting = 0

    # ---- the engine's interface ----------------------------------------------------

    def kv_cache_bytes(self) -> int:
        return self.config.max_slots * self.config.max_cache_length * 64  # a made-up size

    def submit(self, prompt_ids: list[int], options: SamplingOptions) -> RequestHandle:
        if self.fail_on_submit is not None:
            raise self.fail_on_submit
        limit = self.config.max_cache_length
        if not prompt_ids:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(
                f"prompt: {len(prompt_ids)} tokens do not fit the context of {limit} tokens",
                "prompt",
            )
        max_tokens = options.max_tokens or limit - len(prompt_ids)
        if len(prompt_ids) + max_tokens > limit:
            raise InvalidRequestError(
                f"max_tokens: the prompt plus max_tokens ({max_tokens}) exceeds the context",
                "max_tokens",
            )
        if options.n > self.config.max_slots:
            raise InvalidRequestError(f"n: {options.n} exceeds the slots", "n")
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        handle = RequestHandle(list(prompt_ids), options, seed, max_tokens)
        with self._slots:
            if self._waiting >= self.config.max_queue:
                raise QueueFullError("the mock engine's queue is full")
            self._waiting += 1
        self.handles.append(handle)
        threading.Thread(target=self._run, args=(handle,), daemon=True).start()
        return handle

    @property
    def active_slots(self) -> int:
        return self._active

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def shutdown(self) -> None:
        pass

    # ---- the fake generation -----------------------------------------------------------

    def _run(self, handle: RequestHandle) -> None:
        n = handle.options.n
        with self._slots:
            while self._active + n > self.config.max_slots and not handle.cancelled.is_set():
                self._slots.wait(0.02)
            self._waiting -= 1
            started = not handle.cancelled.is_set()
            if started:
                self._active += n
                self.started.append(handle)
        try:
            if started:
                self._generate(handle)
            else:
                for i in range(n):
                    handle.put(Delta(i, "", (), None, "cancelled"))
        except Exception as error:  # what the real scheduler does with a failure
            handle.put(error)
        finally:
            if started:
                with self._slots:
                    self._active -= n
                    self._slots.notify_all()
            handle.put(DONE)

    def _logprob(self, token: str, step: int, alternatives: int) -> TokenLogprob:
        logprob = -0.25 * (1 + step % 3)
        others = [c for c in ALPHABET if c != token][: max(alternatives - 1, 0)]
        top = [TopLogprob(token, ord(token), logprob)] if alternatives else []
        top += [TopLogprob(c, ord(c), logprob - 1 - k) for k, c in enumerate(others)]
        return TokenLogprob(token, ord(token), logprob, tuple(top))

    def _generate(self, handle: RequestHandle) -> None:
        options, prompt = handle.options, handle.prompt_ids
        if options.prompt_logprobs is not None:
            handle.prompt_logprobs = [None] + [
                self._logprob(chr(t) if t < 128 else "?", s, options.prompt_logprobs)
                for s, t in enumerate(prompt[1:])
            ]
        texts = [""] * options.n
        sent = [0] * options.n  # characters of each text delivered so far
        live = set(range(options.n))
        for step in range(handle.max_tokens):
            if self.token_delay:
                time.sleep(self.token_delay)
            if handle.cancelled.is_set():
                for i in sorted(live):
                    handle.put(Delta(i, "", (), None, "cancelled"))
                return
            if self.fail_after is not None and step >= self.fail_after:
                raise RuntimeError("the mock engine failed")
            for i in sorted(live):
                token = expected_token(prompt, options, handle.seed, i, step)
                texts[i] += token
                logprobs = None
                if options.logprobs:
                    logprobs = (self._logprob(token, step, options.top_logprobs),)
                end, finish = self._visible(texts[i], options.stop)
                if finish is None and step == handle.max_tokens - 1:
                    end, finish = len(texts[i]), "length"
                handle.put(Delta(i, texts[i][sent[i] : end], (ord(token),), logprobs, finish))
                sent[i] = end
                if finish:
                    live.discard(i)
            if not live:
                return

    @staticmethod
    def _visible(text: str, stops) -> tuple[int, str | None]:
        """How much of `text` may be sent: up to a stop string (which finishes it), or
        short of a tail that may still grow into one."""
        found = [text.index(s) for s in stops if s in text]
        if found:
            return min(found), "stop"
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held, None
