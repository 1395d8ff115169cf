"""The Lab: a loaded model and its engine, as a researcher holds it in a notebook.

lab = fl.load("smollm2-135m")
lab.generate("The capital of France is", max_tokens=16, temperature=0)
lab.chat([{"role": "user", "content": "Hi"}], seed=7, n=2)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np

from foresight_lab.engine.engine import Engine
from foresight_lab.engine.kv_cache import EngineConfig
from foresight_lab.engine.request import (
    FORESIGHT_DEFAULT_TEMPERATURE,
    Completion,
    Delta,
    InvalidRequestError,
    SamplingOptions,
)
from foresight_lab.forecasting.forecast import (
    Forecaster,
    ForecastRequest,
    PredictionResult,
    calibrated,
)
from foresight_lab.server.serve import ServerHandle, serve
from foresight_lab.tokenizer import render_chat
from foresight_lab.weights import registry
from foresight_lab.weights.loader import LoadedModel, load_model


class Lab:
    """A model ready to sample from. Build one with `foresight_lab.load(...)`."""

    def __init__(self, model: LoadedModel, engine_config: EngineConfig | None = None, mesh=None):
        self.model = model
        self.engine = Engine(model, engine_config, mesh)
        self.tokenizer = model.tokenizer
        self.forecaster = Forecaster(self.engine)

    @property
    def name(self) -> str:
        return self.model.name

    def __repr__(self) -> str:
        c = self.model.config
        return (
            f"Lab({self.name!r}, {c.family}, {c.num_layers} layers, hidden {c.hidden_size}, "
            f"vocab {c.vocab_size}, context {self.engine.config.max_cache_length})"
        )

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 16,
        temperature: float = FORESIGHT_DEFAULT_TEMPERATURE,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        n: int = 1,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        prompt_logprobs: int | None = None,
        ignore_eos: bool = False,
        stream: bool = False,
    ) -> Completion | Iterator[str] | Iterator[Delta]:
        """Continues `prompt` (text, or token ids).

        Returns a Completion (`.text`, `.choices`, `.usage`, `.finish_reason`), or with
        `stream=True` an iterator of text pieces as they are produced (of Delta events,
        which carry the choice `index`, when n > 1).
        """
        if isinstance(prompt, str):
            prompt_ids = self.tokenize(prompt)
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            prompt_ids = list(prompt)
        else:
            raise InvalidRequestError("prompt: must be a string or a list of token ids", "prompt")
        options = SamplingOptions(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            n=n,
            stop=stop,
            seed=seed,
            logprobs=logprobs or top_logprobs > 0,
            top_logprobs=top_logprobs,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=ignore_eos,
        )
        handle = self.engine.submit(prompt_ids, options)
        if stream:
            return _stream(handle, texts_only=n == 1)
        return handle.result()

    def chat(
        self,
        messages: Sequence[dict],
        *,
        max_tokens: int | None = None,
        **sampling,
    ) -> Completion | Iterator[str] | Iterator[Delta]:
        """Replies to a conversation, rendered by the model's own chat template.

        Takes the same sampling arguments as `generate`; max_tokens defaults to the
        rest of the context (the reply ends at the model's end-of-turn token).
        """
        prompt_ids = self.tokenize(self.render_chat(messages), add_special_tokens=False)
        return self.generate(prompt_ids, max_tokens=max_tokens, **sampling)

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        served_model_name: str | Sequence[str] | None = None,
    ) -> ServerHandle:
        """Serves this model at the Foresight (OpenAI-compatible) API in the background.

        Returns at once with a handle: `server.base_url` is what an OpenAI client takes
        (`http://HOST:PORT/openai`), `server.stop()` ends it. port=0 picks a free port;
        api_key defaults to $FORESIGHT_LAB_API_KEY (none: no authentication).
        served_model_name: the model id clients send (default: the lab's name), or a list
        of ids, all accepted, the first named in responses.
        """
        api_key = api_key if api_key is not None else os.environ.get("FORESIGHT_LAB_API_KEY")
        return serve(
            self.engine, host, port, api_key, served_model_name, forecaster=self.forecaster
        )

    def forecast(
        self,
        question: str,
        *,
        answer_type: str | None = "binary",
        reasoning_effort: str = "low",
        research: bool | Sequence[str] | None = None,
        options: Sequence[str] | dict[str, str] | None = None,
        seed: int | None = None,
        temperature: float = FORESIGHT_DEFAULT_TEMPERATURE,
        max_tokens: int | None = None,
        system_prompt: str | None = None,
        calibrator=None,
    ) -> PredictionResult:
        """Answers a forecasting question with probabilities from the model's own distribution.

        answer_type: binary, multiple_choice, continuous, free_response or auto (None: prose).
        reasoning_effort: low (answer at once), medium or high (think first, 256 or 1024
        tokens at most). research: True for every source added with `add_source`, or a
        list of their names. options: a multiple-choice question's options, when the
        question does not list them. The result's fields are named as in Lightning Rod's
        SDK: `.binary.probability`, `.multiple_choice.probabilities`, `.continuous.mean`
        and `.standard_deviation`, `.free_response.text`, and `.content`, `.thinking`,
        `.sources`, `.usage`. calibrator: a `Calibrator` (from `Evaluation.calibrate`)
        applied to a binary probability.
        """
        if not isinstance(question, str) or not question.strip():
            raise InvalidRequestError("question: must be a non-empty string", "question")
        messages = [{"role": "user", "content": question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        request = ForecastRequest.build(
            messages,
            self.forecaster.sources,
            answer_type=answer_type,
            reasoning_effort=reasoning_effort,
            research=research,
            options=options,
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
        )
        result = self.forecaster.forecast(request)
        if calibrator is not None and result.binary is not None:
            result = calibrated(result, calibrator)
        return result

    def add_source(self, name: str, source) -> None:
        """Registers a research source under `name`: local documents (file paths, or dicts
        with "text", "url" and "title") ranked against the question with BM25, or a
        callable `(query, k) -> passages` (dicts like those). Forecasts and served requests
        with `research` read from it; the passages come back as the reply's sources."""
        self.forecaster.sources.add(name, source)

    def render_chat(self, messages: Sequence[dict]) -> str:
        """The prompt text the model's chat template makes of a conversation."""
        _check_messages(messages)
        return render_chat(self.tokenizer, list(messages))

    def playground(self, prompt: str = "The capital of France is"):
        """An ipywidgets app to sample from this model and inspect its next-token choices."""
        from foresight_lab.widgets import Playground  # the notebook floor, loaded on demand

        return Playground(self, prompt)

    def next_token_distribution(
        self,
        prompt: str | Sequence[int],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> NextTokenDistribution:
        """The model's probabilities for the token after `prompt`, and what the sampler
        would draw from under these settings (for looking, not generating)."""
        prompt_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        options = SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        model, sampling = self.engine.next_token_distribution(prompt_ids, options)
        return NextTokenDistribution(model, sampling, self.tokenizer)

    def warmup(self, progress: bool | None = None, clear_jax_caches: bool = False) -> Lab:
        """Compiles every shape that generation can run (prefill, decode, a prompt's
        logprobs), so no request waits to compile (`Engine.warmup`; clear_jax_caches is
        for a process that only serves). `next_token_distribution` is not among them: it
        compiles once for each prompt-length bucket it is first called with."""
        self.engine.warmup(progress=progress, clear_jax_caches=clear_jax_caches)
        return self


@dataclasses.dataclass(frozen=True)
class NextTokenDistribution:
    model: np.ndarray  # Float['V'], the model's own probabilities
    sampling: np.ndarray  # Float['V'], after temperature, top_k, top_p and min_p
    tokenizer: object

    def top(self, k: int = 10, by: str = "model") -> list[tuple[str, int, float, float]]:
        """The k most likely tokens: (text, id, model probability, sampling probability)."""
        order = np.argsort(-getattr(self, by), kind="stable")[:k]
        return [
            (self.tokenizer.decode([int(i)]), int(i), float(self.model[i]), float(self.sampling[i]))
            for i in order
        ]

    @property
    def kept(self) -> int:
        """How many tokens the sampler could draw."""
        return int(np.count_nonzero(self.sampling))


def _stream(handle, texts_only: bool):
    try:
        for delta in handle:
            if not texts_only:
                yield delta
            elif delta.text:
                yield delta.text
    finally:
        handle.cancel()  # a consumer that stops early frees the slots


def _check_messages(messages) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequestError("messages: must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidRequestError(
                f"messages[{i}]: each message must be a dict with 'role' and 'content'",
                f"messages[{i}]",
            )


def load(
    model: str = registry.DEFAULT_MODEL,
    *,
    max_slots: int = 8,
    max_cache_length: int = 2048,
    kv_cache_dtype: str = EngineConfig.kv_cache_dtype,
    activation_bits: int = EngineConfig.activation_bits,
    progress: bool | None = None,
    warmup: bool = False,
    mesh=None,
    quantized: bool = True,
) -> Lab:
    """Loads MODEL (a built-in alias, a .gguf file, or a Hugging Face directory).

    max_slots sequences decode together (n choices each take one); max_cache_length
    tokens (prompt plus completion) fit each. Together with kv_cache_dtype ("float16",
    or "float32" for keys and values exactly as computed) they fix the KV cache budget.
    mesh: a `jax.sharding.Mesh` with axes ("data", "model") to spread the model and
    cache over several devices (`foresight_lab.make_mesh()` builds one).
    quantized: keep a GGUF's Q4_1 and Q8_0 weights in their blocks (about the file's
    size in memory); False dequantizes them to float32 (four to seven times larger,
    the reference the quantized path is tested against).
    activation_bits: 16, or 8 to round each block of 32 inputs of a Q4_1 matmul to 8
    bits in the CPU kernel, as llama.cpp does: decode about a fifth faster, each
    product about 1e-3 of its scale from float32's instead of 2e-5 (on SmolLM2 a
    token's logprob moves by up to about 0.2), and greedy text that parts from the
    float32 path sooner. GPU and TPU compute in float32 either way.
    """
    loaded = load_model(model, progress=progress, quantized=quantized)
    max_cache_length = min(max_cache_length, loaded.config.max_position_embeddings)
    config = EngineConfig(
        max_slots=max_slots,
        max_cache_length=max_cache_length,
        kv_cache_dtype=kv_cache_dtype,
        activation_bits=activation_bits,
    )
    lab = Lab(loaded, config, mesh)
    if warmup:
        lab.warmup(progress=progress)
    return lab
