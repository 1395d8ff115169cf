"""What a caller asks of the engine, and what it gets back.

Validation lives here, once, for the notebook API and the HTTP server alike: every
check raises `InvalidRequestError` naming the field (OpenAI's `param`) and saying
what to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
FORESIGHT_DEFAULT_TEMPERATURE = 0.6


class InvalidRequestError(ValueError):
    """A request the engine cannot run as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(f"{param}: {message}", param)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample one request. Field names and meanings follow the OpenAI API."""

    max_tokens: int | None = 16  # None: until EOS, a stop string, or the context is full
    temperature: float = FORESIGHT_DEFAULT_TEMPERATURE  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed per request
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks, tests)
    # Subtracted from a token's logit: once if it was generated before, and per time.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_logprobs: int | None = None  # logprobs of the prompt's tokens, with k alternatives

    def __post_init__(self):
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Sequence):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self.validate()

    def validate(self) -> None:
        t, p = self.temperature, self.top_p
        _check(_is_number(t) and 0 <= t <= 2, "temperature", f"must be between 0 and 2, got {t!r}")
        _check(_is_number(p) and 0 < p <= 1, "top_p", f"must be in (0, 1], got {p!r}")
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            f"must be a whole number >= 0 (0 or -1 turns it off), got {self.top_k!r}",
        )
        _check(
            _is_number(self.min_p) and 0 <= self.min_p <= 1,
            "min_p",
            f"must be between 0 and 1, got {self.min_p!r}",
        )
        _check(_is_int(self.n) and self.n >= 1, "n", f"must be a whole number >= 1, got {self.n!r}")
        if self.max_tokens is not None:
            _check(
                _is_int(self.max_tokens) and self.max_tokens >= 1,
                "max_tokens",
                f"must be a whole number >= 1, got {self.max_tokens!r}",
            )
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            "stop",
            f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "each stop sequence must be a non-empty string",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _is_number(value) and -2 <= value <= 2,
                name,
                f"must be between -2 and 2, got {value!r}",
            )
        if self.prompt_logprobs is not None:
            _check(
                _is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                "prompt_logprobs",
                f"must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {self.prompt_logprobs!r}",
            )
        if self.seed is not None:
            _check(_is_int(self.seed), "seed", f"must be a whole number, got {self.seed!r}")
        _check(
            _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}",
        )


@dataclasses.dataclass(frozen=True)
class TopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and, when asked, the most likely alternatives."""

    token: str
    token_id: int
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class Delta:
    """A piece of one choice as it is produced; the last one carries finish_reason."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled"


@dataclasses.dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: its choices, in index order, and token usage."""

    choices: list[Choice]
    usage: Usage
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked: None for the first

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    def __repr__(self) -> str:
        texts = ", ".join(repr(c.text) for c in self.choices)
        return f"Completion([{texts}], finish_reason={self.finish_reason!r}, usage={self.usage})"


def collect(deltas, prompt_token_ids: Sequence[int], n: int, with_logprobs: bool) -> Completion:
    """Folds a stream of deltas into a Completion."""
    choices = [Choice(i, logprobs=[] if with_logprobs else None) for i in range(n)]
    for delta in deltas:
        choice = choices[delta.index]
        choice.text += delta.text
        choice.token_ids.extend(delta.token_ids)
        if delta.logprobs and choice.logprobs is not None:
            choice.logprobs.extend(delta.logprobs)
        if delta.finish_reason:
            choice.finish_reason = delta.finish_reason
    usage = Usage(len(prompt_token_ids), sum(len(c.token_ids) for c in choices))
    return Completion(choices, usage, list(prompt_token_ids))
