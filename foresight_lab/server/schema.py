"""Request bodies of the Foresight (OpenAI-compatible) API, field by field.

Types and shapes are checked here, strictly as the OpenAI API does (`"temperature": "hot"`
or `"n": 1.5` is a 400, not a guess); ranges and limits by the engine's
`SamplingOptions`, the one place both the notebook API and the server check them.
`null` means the field's default. Fields this server does not know are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from foresight_lab.engine.request import FORESIGHT_DEFAULT_TEMPERATURE, SamplingOptions
from foresight_lab.forecasting import answers
from foresight_lab.forecasting.forecast import ForecastRequest
from foresight_lab.server.errors import BadRequest


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_content(value):
    """A message's content: a string, or a list of text parts, joined into one string."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(
                f"part {i} has type {kind!r}; this server reads text only: each part must be "
                '{"type": "text", "text": ...}'
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part {i}: its text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _prompts(value) -> list:
    """A completion prompt as a list: of strings, or of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_token_id(t) for t in value):
            return [value]
        if all(isinstance(p, str) for p in value):
            return value
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
            return value
    if value == []:
        raise ValueError("must not be empty")
    raise ValueError(
        "must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
    )


def _stops(value) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of up to 4 strings")


TextContent = Annotated[str | None, BeforeValidator(_text_content)]
Prompts = Annotated[list[str | list[int]], BeforeValidator(_prompts)]
Stops = Annotated[list[str], BeforeValidator(_stops)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    role: str
    content: TextContent = None
    name: str | None = None


class _Sampling(_Body):
    """The fields both completion routes share."""

    model: str
    temperature: float = FORESIGHT_DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: Stops = []
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: keep going past end-of-sequence
    user: str | None = None  # accepted, unused

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options: only allowed when stream is true", "stream_options")

    def _options(self, max_tokens: int | None, **extra: Any) -> SamplingOptions:
        """Raises the engine's InvalidRequestError for values out of range."""
        self.check_stream_options()
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            n=self.n,
            stop=tuple(self.stop),
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
    top_logprobs: int | None = None  # 0 to 20 alternatives per token; needs logprobs
    # Foresight's own fields (forecasting/forecast.py does what they ask).
    answer_type: str | None = None
    reasoning_effort: str | None = None
    research: Any = None  # true, or {"sources": [names]}; checked by the lab's sources
    options: Any = None  # a multiple-choice question's options: a list, or label -> text

    @property
    def max_tokens_field(self) -> str:
        """The name of the field the token limit came from, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def max_tokens_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def sampling_options(self) -> SamplingOptions:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest(
                "top_logprobs: requires logprobs to be true", "top_logprobs", "invalid_value"
            )
        return self._options(
            self.max_tokens_limit, logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0
        )

    def forecast_request(self, sources) -> ForecastRequest | None:
        """The forecast this request asks for, or None for a plain reply (no answer type,
        no research, low or no reasoning effort)."""
        effort = answers.reasoning_effort(self.reasoning_effort)
        kind = answers.answer_type(self.answer_type)
        if kind is None and effort == "low" and self.research in (None, False):
            if self.options is not None:
                raise BadRequest("options: only used with an answer_type", "options")
            return None
        if self.n != 1:
            raise BadRequest(
                f"n: a forecast (answer_type, reasoning_effort or research) has one choice; "
                f"got n={self.n}",
                "n",
            )
        if self.logprobs:
            raise BadRequest(
                "logprobs: not available for forecasts (answer_type, reasoning_effort or "
                "research); their probabilities are in the answer",
                "logprobs",
            )
        self.check_stream_options()
        return ForecastRequest.build(
            self.conversation(),
            sources,
            answer_type=kind,
            reasoning_effort=effort,
            research=self.research,
            options=self.options,
            max_tokens=self.max_tokens_limit,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=tuple(self.stop),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: Prompts
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # 0 to 20 alternatives per token; 0: the chosen token only
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def sampling_options(self) -> SamplingOptions:
        if self.suffix:
            raise BadRequest("suffix: not supported by this server", "suffix", "unsupported")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequest(
                f"best_of: only best_of equal to n ({self.n}) is supported, got {self.best_of}",
                "best_of",
                "unsupported",
            )
        wants = self.logprobs is not None
        return self._options(
            self.max_tokens,
            logprobs=wants,
            top_logprobs=self.logprobs or 0,
            prompt_logprobs=self.logprobs if (wants and self.echo) else None,
        )
