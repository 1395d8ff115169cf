"""Request bodies of the Foresight (OpenAI-compatible) API, field by field.

Types and shapes are checked here by pydantic; ranges and limits by the engine's
`SamplingOptions`, the one place both the notebook API and the server validate. Fields
a client may send that this server does not use are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from foresight_lab.engine.request import FORESIGHT_DEFAULT_TEMPERATURE, SamplingOptions
from foresight_lab.server.errors import BadRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Sampling(_Body):
    model: str
    temperature: float = FORESIGHT_DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def options(self, max_tokens: int | None, **extra: Any) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            n=self.n,
            stop=self.stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            **extra,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: the rest of the context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    # Foresight's own fields, accepted (their effect comes with the forecasting work).
    answer_type: str | None = None
    reasoning_effort: str | None = None
    research: bool | dict | None = None

    def sampling_options(self) -> SamplingOptions:
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs: requires logprobs to be true", "top_logprobs")
        limit = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if limit is not None and limit < 1:
            raise BadRequest(f"{param}: must be a whole number >= 1, got {limit}", param)
        return self.options(limit, logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0)

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # how many alternatives per token; 0 = the chosen token only
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: texts, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise BadRequest("prompt: must not be empty", "prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)

    def sampling_options(self) -> SamplingOptions:
        wants = self.logprobs is not None
        return self.options(
            self.max_tokens,
            logprobs=wants,
            top_logprobs=self.logprobs or 0,
            prompt_logprobs=self.logprobs if (wants and self.echo) else None,
        )
