"""Forecasts from the model's own distribution: the `answer_type`, `reasoning_effort`
and `research` of the Foresight API, and `lab.forecast`.

A forecast runs in steps, each a request to the same engine:

    research    passages from the registered sources go into the prompt, before the question
    thinking    medium or high effort: up to 256 or 1024 sampled tokens of reasoning,
                inside <think> for models whose template has it (Qwen3), else as plain
                text after "Let me think step by step."
    answer      after "Answer:", read from the model's next-token distribution:
                  binary           P(" Yes") / (P(" Yes") + P(" No"))
                  multiple choice  P(" A"), P(" B"), ... normalized over the option labels
                  continuous       mean and standard deviation of 8 seeded samples drawn at
                                   temperature 1 (the model's own distribution), one number each
                  free response    the reply, sampled as asked
                The token probabilities are exact: each candidate is scored as the next
                prompt token (prompt logprobs), not looked up in a top-k list.

Everything random is drawn from the request's seed, so a seed gives the same forecast.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
import statistics
import threading
from collections.abc import Iterator, Mapping, Sequence

from foresight_lab.engine.request import (
    FORESIGHT_DEFAULT_TEMPERATURE,
    InvalidRequestError,
    SamplingOptions,
    Usage,
)
from foresight_lab.forecasting import answers
from foresight_lab.forecasting.answers import (
    BINARY,
    CONTINUOUS,
    FREE_RESPONSE,
    MULTIPLE_CHOICE,
)
from foresight_lab.forecasting.research import Passage, Sources
from foresight_lab.tokenizer import render_chat

THINKING_BUDGET = {"low": 0, "medium": 256, "high": 1024}
CONTINUOUS_SAMPLES = 8
CONTINUOUS_SAMPLE_TOKENS = 16
FREE_RESPONSE_TOKENS = 256  # the reply's default limit when max_tokens is not given
ANSWER_PREFIX = "Answer:"
ANSWER_ROOM = 48  # context tokens kept free for the answer after thinking
YES, NO = " Yes", " No"
INSTRUCTIONS = {
    BINARY: "Answer Yes or No.",
    MULTIPLE_CHOICE: "Answer with the letter of one option.",
    CONTINUOUS: "Answer with a single number.",
    FREE_RESPONSE: "Answer briefly.",
}
# Opens the thinking of a model without a native format: small models given only the
# instruction tend to answer at once; this lead-in gets them reasoning.
THINKING_LEAD = "Let me think step by step.\n"
THINK_FIRST = "Think it through step by step first, then give your answer after 'Answer:'."
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


# ---- results, named as in Lightning Rod's SDK (lightningrod-ai) ---------------------------


@dataclasses.dataclass(frozen=True)
class BinaryPrediction:
    probability: float  # of yes


@dataclasses.dataclass(frozen=True)
class ContinuousPrediction:
    mean: float
    standard_deviation: float
    samples: tuple[float, ...] = ()  # the numbers the model gave


@dataclasses.dataclass(frozen=True)
class MultiChoicePrediction:
    probabilities: dict[str, float]  # keyed by the option's text, as the SDK keys them
    options: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> text

    def by_label(self) -> dict[str, float]:
        """The probabilities keyed by the option labels (A, B, ...)."""
        return {label: self.probabilities[text] for label, text in self.options.items()}


@dataclasses.dataclass(frozen=True)
class FreeResponsePrediction:
    text: str


@dataclasses.dataclass(frozen=True)
class Source:
    url: str
    title: str


@dataclasses.dataclass
class PredictionResult:
    """A forecast: the full content (ending with the answer tags), the thinking, the
    sources used, token usage, and the typed prediction of its answer type."""

    content: str
    thinking: str | None
    sources: list[Source]
    usage: Usage
    model: str
    id: str
    answer_type: str | None = None  # the type answered (auto resolves to one)
    binary: BinaryPrediction | None = None
    continuous: ContinuousPrediction | None = None
    multiple_choice: MultiChoicePrediction | None = None
    free_response: FreeResponsePrediction | None = None


def calibrated(result: PredictionResult, calibrator) -> PredictionResult:
    """A binary forecast with its probability passed through `calibrator` (content too)."""
    probability = float(calibrator(result.binary.probability))
    tag = answers.binary_tag(result.binary.probability)
    content = result.content.removesuffix(tag) + answers.binary_tag(probability)
    return dataclasses.replace(result, content=content, binary=BinaryPrediction(probability))


# ---- the request ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForecastRequest:
    """A validated forecast request; build it with `ForecastRequest.build`."""

    messages: tuple[dict, ...]
    answer_type: str | None  # None: prose, no answer tags
    reasoning_effort: str
    research: tuple[str, ...]  # source names
    options: dict[str, str] | None
    sampling: SamplingOptions  # for thinking and free text; n is 1
    max_tokens: int | None  # the reply's limit (free response and prose)

    @classmethod
    def build(
        cls,
        messages: Sequence[Mapping],
        sources: Sources,
        *,
        answer_type=None,
        reasoning_effort=None,
        research=None,
        options=None,
        max_tokens: int | None = None,
        temperature: float = FORESIGHT_DEFAULT_TEMPERATURE,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop=None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> ForecastRequest:
        """Raises InvalidRequestError naming the field for anything that cannot run."""
        messages = tuple(dict(m) for m in messages)
        if not any(m.get("role") == "user" for m in messages):
            raise InvalidRequestError(
                "messages: a forecast needs a user message that asks the question", "messages"
            )
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed if seed is not None else secrets.randbits(63),
            stop=stop,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )
        return cls(
            messages=messages,
            answer_type=answers.answer_type(answer_type),
            reasoning_effort=answers.reasoning_effort(reasoning_effort),
            research=tuple(sources.chosen(research)),
            options=answers.options_from(options),
            sampling=sampling,
            max_tokens=max_tokens,
        )

    @property
    def question(self) -> str:
        return next(m for m in reversed(self.messages) if m.get("role") == "user")["content"] or ""


class ForecastCancelled(RuntimeError):
    pass


# ---- the forecaster -----------------------------------------------------------------------


class Forecaster:
    """Runs forecasts on an engine, with the research sources registered for it."""

    def __init__(self, engine, name: str | None = None):
        self.engine = engine
        self.tokenizer = engine.model.tokenizer
        self.name = name or engine.model.name
        self.sources = Sources()
        template = engine.model.chat_template or ""
        self.native_thinking = "<think>" in template

    def run(self, request: ForecastRequest) -> ForecastRun:
        """Prepares a forecast (research, options, the prompt) and returns its run; raises
        InvalidRequestError for a question this model cannot answer as asked."""
        return ForecastRun(self, request)

    def forecast(self, request: ForecastRequest) -> PredictionResult:
        return self.run(request).finish()

    # ---- pieces the run uses ----------------------------------------------------------

    def render(self, messages: list[dict]) -> str:
        if self.engine.model.chat_template:
            return render_chat(self.tokenizer, messages)
        return "\n\n".join(str(m.get("content") or "") for m in messages) + "\n\n"

    def tokenize(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; a plain prompt gets the usual ones.
        special = not self.engine.model.chat_template
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def candidates(self, texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """(shared, tokens): the tokens all answers start with, then the one token where
        each answer parts from the others. " Yes" and " No" are one token each in most
        vocabularies; where they are not (" ", "Y", ...), the shared space is read as part
        of the prompt and the answers are told apart by their next token."""
        encoded = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        shared = 0
        while all(len(e) > shared + 1 for e in encoded) and len({e[shared] for e in encoded}) == 1:
            shared += 1
        tokens = [e[shared] for e in encoded]
        if len(set(tokens)) != len(tokens) or any(
            e[:shared] != encoded[0][:shared] for e in encoded
        ):
            raise InvalidRequestError(
                f"answer_type: this model's tokenizer cannot tell the answers {list(texts)} "
                "apart by a token",
                "answer_type",
            )
        return encoded[0][:shared], tokens


class ForecastRun:
    """One forecast in progress: iterate `events()` for ("thinking" | "content", text)
    pieces as they are produced; `result` is set when they end. `cancel()` stops it."""

    def __init__(self, forecaster: Forecaster, request: ForecastRequest):
        self.forecaster = forecaster
        self.request = request
        self.result: PredictionResult | None = None
        self.finish_reason = "stop"  # "length" when a free-text reply hit max_tokens
        self.answer_prompt: str | None = None  # the text the answer is read after
        self._handles: list = []
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        question = request.question
        self.kind = request.answer_type
        if self.kind == answers.AUTO:
            self.kind = answers.classify(question, request.options)
        self.options = request.options
        listed = False
        if self.kind == MULTIPLE_CHOICE and self.options is None:
            lettered = answers.options_in(question)
            if lettered is None:
                raise InvalidRequestError(
                    "options: a multiple_choice question needs its options: lines like "
                    "'A) ...' or '- ...' in the question, a JSON list of strings in it, or "
                    "the options field",
                    "options",
                )
            self.options = lettered
            listed = all(re.search(rf"^\s*\(?{label}[).:]", question, re.M) for label in lettered)
        self.passages: list[Passage] = forecaster.sources.retrieve(question, request.research)
        self.prompt = forecaster.render(self._messages(listed))
        self.prompt_tokens = len(forecaster.tokenize(self.prompt))
        context = forecaster.engine.config.max_cache_length
        if self.prompt_tokens + 8 >= context:
            raise InvalidRequestError(
                f"messages: the forecast's prompt ({self.prompt_tokens} tokens, with research "
                f"passages and instructions) leaves no room in the context of {context} tokens",
                "messages",
            )

    def _messages(self, options_listed: bool) -> list[dict]:
        request, messages = self.request, [dict(m) for m in self.request.messages]
        last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        parts = []
        if self.passages:
            found = "\n\n".join(
                f"[{i}] {p.title} ({p.url})\n{p.text}" for i, p in enumerate(self.passages, 1)
            )
            parts.append(f"Background from research:\n{found}")
        parts.append(request.question)
        if self.options and not options_listed:
            parts.append("\n".join(f"{label}) {text}" for label, text in self.options.items()))
        instruction = INSTRUCTIONS.get(self.kind, "")
        if THINKING_BUDGET[request.reasoning_effort] and not self.forecaster.native_thinking:
            instruction = f"{THINK_FIRST} {instruction}".strip()
        if instruction:
            parts.append(instruction)
        messages[last_user] = {**messages[last_user], "content": "\n\n".join(parts)}
        return messages

    # ---- running ---------------------------------------------------------------------

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            for handle in self._handles:
                handle.cancel()

    def _submit(self, prompt_ids: list[int], options: SamplingOptions):
        with self._lock:
            if self._cancelled.is_set():
                raise ForecastCancelled("the forecast was cancelled")
            handle = self.forecaster.engine.submit(prompt_ids, options)
            self._handles.append(handle)
            return handle

    def _room(self, prompt: str) -> int:
        return self.forecaster.engine.config.max_cache_length - len(
            self.forecaster.tokenize(prompt)
        )

    def _fit(self, thinking: str, around: str) -> str:
        """The thinking as the answer reads it, cut where it must be so that the answer fits:
        its text, tokenized again, can take more tokens than were sampled (a random
        model's broken UTF-8 comes back as replacement characters)."""
        room = self._room(self.prompt + around + ANSWER_PREFIX) - ANSWER_ROOM
        tokens = self.forecaster.tokenizer.encode(thinking, add_special_tokens=False)
        if len(tokens) <= room:
            return thinking
        return self.forecaster.tokenizer.decode(tokens[: max(room, 0)]).strip()

    def finish(self) -> PredictionResult:
        """Runs the forecast to its end and returns the result."""
        for _ in self.events():
            pass
        return self.result

    def events(self) -> Iterator[tuple[str, str]]:
        forecaster, request = self.forecaster, self.request
        completion_tokens = 0
        try:
            # Thinking, streamed as it comes.
            thinking = None
            opener, closer = (
                ("<think>\n", "\n</think>\n\n")
                if forecaster.native_thinking
                else (THINKING_LEAD, "\n\n")
            )
            budget = min(
                THINKING_BUDGET[request.reasoning_effort], self._room(self.prompt) - ANSWER_ROOM
            )
            answer_prompt = self.prompt
            if budget > 0:
                stop = ("</think>",) if forecaster.native_thinking else (ANSWER_PREFIX,)
                options = dataclasses.replace(request.sampling, max_tokens=budget, stop=stop)
                handle = self._submit(forecaster.tokenize(self.prompt + opener), options)
                pieces = []
                for delta in handle:
                    completion_tokens += len(delta.token_ids)
                    if delta.text:
                        pieces.append(delta.text)
                        yield "thinking", delta.text
                thinking = "".join(pieces).strip()
                fitted = self._fit(thinking, opener + closer)
                answer_prompt = self.prompt + opener + fitted + closer
            elif forecaster.native_thinking:
                answer_prompt = self.prompt + "<think>\n\n</think>\n\n"

            # The answer.
            content = ""
            if self.kind in (BINARY, MULTIPLE_CHOICE, CONTINUOUS):
                answer_prompt += ANSWER_PREFIX
            self.answer_prompt = answer_prompt
            if self.kind == BINARY:
                [p_yes, _] = self._probabilities(answer_prompt, [YES, NO])
                prediction = {"binary": BinaryPrediction(p_yes)}
                content = answers.binary_tag(p_yes)
                completion_tokens += 1
            elif self.kind == MULTIPLE_CHOICE:
                labels = list(self.options)
                chances = self._probabilities(answer_prompt, [f" {label}" for label in labels])
                by_label = dict(zip(labels, chances, strict=True))
                by_text = {self.options[label]: p for label, p in by_label.items()}
                prediction = {"multiple_choice": MultiChoicePrediction(by_text, dict(self.options))}
                content = answers.multiple_choice_tag(self.options, by_label)
                completion_tokens += 1
            elif self.kind == CONTINUOUS:
                samples, used = self._numbers(answer_prompt)
                completion_tokens += used
                if samples:
                    mean = statistics.fmean(samples)
                    spread = statistics.stdev(samples) if len(samples) > 1 else 0.0
                    prediction = {"continuous": ContinuousPrediction(mean, spread, tuple(samples))}
                    content = answers.continuous_tag(mean, spread)
                else:  # said plainly, without a made-up answer
                    prediction = {}
                    content = "The model gave no number in its samples, so there is no answer."
            else:  # free response, or prose without an answer type
                pieces = []
                limit = request.max_tokens or min(FREE_RESPONSE_TOKENS, self._room(answer_prompt))
                options = dataclasses.replace(request.sampling, max_tokens=limit)
                tagged = self.kind == FREE_RESPONSE
                if tagged:
                    yield "content", "<answer>"
                for delta in self._submit(forecaster.tokenize(answer_prompt), options):
                    completion_tokens += len(delta.token_ids)
                    text = delta.text.lstrip() if not pieces else delta.text
                    if delta.finish_reason == "length":
                        self.finish_reason = "length"
                    if text:
                        pieces.append(text)
                        yield "content", text
                text = "".join(pieces).rstrip()
                if tagged:
                    yield "content", "</answer>"
                    content = answers.free_response_tag(text)
                    prediction = {"free_response": FreeResponsePrediction(text)}
                else:
                    content, prediction = text, {}
            if self.kind in (BINARY, MULTIPLE_CHOICE, CONTINUOUS):
                yield "content", content
            self.result = PredictionResult(
                content=content,
                thinking=thinking,
                sources=[Source(p.url, p.title) for p in self.passages],
                usage=Usage(self.prompt_tokens, completion_tokens),
                model=forecaster.name,
                id=f"forecast-{secrets.token_hex(12)}",
                answer_type=self.kind,
                **prediction,
            )
        finally:
            self.cancel()  # whatever is still running stops

    def _probabilities(self, prompt: str, answers_: Sequence[str]) -> list[float]:
        """P(each answer's first token | prompt), normalized over the answers. Each is
        scored exactly, as the next prompt token of its own request (batched together)."""
        forecaster = self.forecaster
        shared, tokens = forecaster.candidates(answers_)
        prompt_ids = forecaster.tokenize(prompt) + shared
        score = SamplingOptions(max_tokens=1, temperature=0, prompt_logprobs=0)
        handles = [self._submit(prompt_ids + [token], score) for token in tokens]
        logprobs = [handle.result().prompt_logprobs[-1].logprob for handle in handles]
        return answers.normalized(logprobs)

    def _numbers(self, prompt: str) -> tuple[list[float], int]:
        """One number from each of several seeded samples (temperature 1), and the
        tokens they took."""
        engine = self.forecaster.engine
        n = min(CONTINUOUS_SAMPLES, engine.config.max_slots)
        limit = min(CONTINUOUS_SAMPLE_TOKENS, self._room(prompt) - 1)
        options = SamplingOptions(
            max_tokens=limit, temperature=1.0, n=n, stop=("\n",), seed=self.request.sampling.seed
        )
        done = self._submit(self.forecaster.tokenize(prompt), options).result()
        numbers = []
        for choice in done.choices:
            found = _NUMBER.search(choice.text)
            if found:
                value = float(found.group().replace(",", ""))
                if math.isfinite(value):
                    numbers.append(value)
        return numbers, done.usage.completion_tokens
