"""The Starlette app: parse and validate, call the engine, format OpenAI objects, stream SSE.

    POST /openai/chat/completions   chat.completion, or chat.completion.chunk events
    POST /openai/completions        text_completion, or a stream of them
    GET  /openai/models             the served model, in a list
    GET  /openai/models/{id}        the served model
    GET  /metrics                   counters and the engine's figures, for Prometheus (open)

It never touches jax arrays: the engine's narrow interface (`submit`, request handles
read with `async for`, `cancel`) is all it uses. Tokenizing runs in a worker thread and
generation in the engine's, so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import pydantic
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from foresight_lab.engine.request import (
    Delta,
    InvalidRequestError,
    QueueFullError,
    SamplingOptions,
    TokenLogprob,
    collect,
)
from foresight_lab.forecasting.forecast import Forecaster, ForecastRun
from foresight_lab.server.errors import (
    APIError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from foresight_lab.server.metrics import CONTENT_TYPE, CountRequests, Metrics
from foresight_lab.server.schema import ChatCompletionRequest, CompletionRequest
from foresight_lab.tokenizer import render_chat

log = logging.getLogger("foresight_lab.server")
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
CLIENT_CLOSED_REQUEST = 499  # the status access logs show for a client that hung up
METRICS_PATH = "/metrics"  # at the root, where vLLM and llama.cpp's server have it


# ---- the request side ----------------------------------------------------------------


def _param(location: tuple) -> str:
    """A pydantic error location as OpenAI's `param`: `messages.0.content`."""
    parts = [str(p) for p in location if isinstance(p, int) or str(p).isidentifier()]
    return ".".join(parts)


def _validation_error(error: pydantic.ValidationError) -> BadRequest:
    first = error.errors(include_url=False)[0]
    param = _param(first["loc"])
    if first["type"] == "missing":
        problem = "this field is required"
    elif first["type"] == "value_error":  # our own shape checks say it in full
        problem = str(first["ctx"]["error"])
    else:
        problem = re.sub(r" or instance of \w+| after validation", "", first["msg"])
        problem = problem[0].lower() + problem[1:]
        shown = repr(first["input"])
        if len(shown) <= 40:
            problem += f", got {shown}"
    return BadRequest(f"{param}: {problem}" if param else problem, param or None)


@contextlib.contextmanager
def fields_as_sent(renames: dict[str, str]) -> Iterator[None]:
    """Turns the engine's InvalidRequestError into a 400 that names the field as the
    client sent it (`logprobs`, not the engine's `top_logprobs`; `prompt.2`)."""
    try:
        yield
    except InvalidRequestError as error:
        old = error.param or ""
        new = renames.get(old, old)
        message = error.message
        if new.startswith(old + "."):  # one element of the field: name it in the prefix
            if message.startswith(old + ":"):
                message = new + message[len(old) :]
        elif new != old:
            message = re.sub(rf"\b{re.escape(old)}\b", new, message)
        raise BadRequest(message, new or None) from error


class Service:
    """What the routes share: the engine, the served name, the key, the limits and the
    metrics."""

    def __init__(
        self,
        engine,
        api_key: str | None,
        served_model_name: str | Sequence[str],
        max_body_bytes: int,
        forecaster: Forecaster | None = None,
    ):
        self.engine = engine
        self.forecaster = forecaster or Forecaster(engine)
        self.tokenizer = engine.model.tokenizer
        self.api_key = api_key
        names = [served_model_name] if isinstance(served_model_name, str) else served_model_name
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("served_model_name: a name, or a list of names, none empty")
        # Requests may name any of them; responses name the first, as vLLM's do.
        self.names = list(dict.fromkeys(names))
        self.model = self.names[0]
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.metrics = Metrics()

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized(
                "Authorization: missing API key; send the header 'Authorization: Bearer <key>'"
            )
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise Unauthorized("Authorization: incorrect API key")

    async def read_json(self, request: Request) -> dict:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type: the body must be JSON (application/json), got {media_type!r}",
                code="unsupported_media_type",
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(self.max_body_bytes)
        body = bytearray()
        async for piece in request.stream():  # the declared length may be absent or false
            body += piece
            if len(body) > self.max_body_bytes:
                raise PayloadTooLarge(self.max_body_bytes)
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
            raise BadRequest(f"request body: not valid JSON ({error})") from error
        if not isinstance(value, dict):
            raise BadRequest(f"request body: must be a JSON object, got {type(value).__name__}")
        return value

    def parse(self, schema: type[pydantic.BaseModel], body: dict):
        try:
            parsed = schema.model_validate(body)
        except pydantic.ValidationError as error:
            raise _validation_error(error) from error
        self.check_model(parsed.model)
        return parsed

    def check_model(self, name: str) -> None:
        if name not in self.names:
            served = ", ".join(repr(n) for n in self.names)
            raise NotFound(
                f"model: {name!r} is not served here; this server serves {served}",
                "model",
                "model_not_found",
            )

    def check_token_ids(self, prompt: list[int], param: str) -> None:
        vocab_size = self.engine.model.config.vocab_size
        for token_id in prompt:
            if not 0 <= token_id < vocab_size:
                raise BadRequest(
                    f"{param}: token id {token_id} is outside the vocabulary (0 to "
                    f"{vocab_size - 1})",
                    param,
                )

    def submit(
        self, prompts: list[list[int]], options: SamplingOptions, renames: dict[str, str]
    ) -> list:
        """One engine request per prompt; none is left running if any cannot start."""
        if options.top_k > self.engine.model.config.vocab_size:
            # Keeping more tokens than there are is keeping all: top_k off. (Passed on,
            # a huge top_k would overflow the sampler's int32.)
            options = dataclasses.replace(options, top_k=0)
        handles = []
        try:
            for i, prompt_ids in enumerate(prompts):
                names = {**renames, "prompt": f"prompt.{i}"} if len(prompts) > 1 else renames
                with fields_as_sent(names):
                    handles.append(self.engine.submit(prompt_ids, options))
        except QueueFullError as error:
            _cancel(handles)
            raise TooManyRequests(str(error), error.retry_after) from error
        except BaseException:
            _cancel(handles)
            raise
        return handles

    # ---- the response side -------------------------------------------------------

    def envelope(self, prefix: str, kind: str) -> dict:
        return {
            "id": f"{prefix}-{secrets.token_hex(16)}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": None,
        }

    def model_card(self, name: str) -> dict:
        context = self.engine.config.max_cache_length
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "foresight-lab",
            "root": self.model,
            "context_length": context,
            "max_model_len": context,  # vLLM's name for it
            "max_completion_tokens": context - 1,  # after a one-token prompt
        }


def _cancel(handles) -> None:
    for handle in handles:
        handle.cancel()


# ---- waiting for the engine ------------------------------------------------------------


async def _merged(handles: list) -> AsyncIterator[tuple[int, Delta]]:
    """(which handle, delta) from several requests as they come. The requests are
    cancelled if the consumer stops early; an engine failure is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle):
        try:
            async for delta in handle:
                await queue.put((i, delta))
            await queue.put((i, None))
        except Exception as error:  # the engine failed: the consumer raises it
            await queue.put((i, error))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            if event is None:
                remaining -= 1
            else:
                yield i, event
    finally:
        _cancel(handles)
        for task in tasks:
            task.cancel()


async def _client_gone(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_gone(request: Request, work, running: list):
    """The result of `work` (a coroutine); None if the client hangs up first. Either way
    the `running` requests (anything with cancel()) are cancelled when it returns."""
    work = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        return None
    finally:
        _cancel(running)
        work.cancel()
        watch.cancel()


async def _all_deltas(request: Request, handles: list) -> list[list[Delta]] | None:
    """Every request's deltas, in order; None (and the requests cancelled) if the client
    hangs up first."""

    async def gather() -> list[list[Delta]]:
        deltas: list[list[Delta]] = [[] for _ in handles]
        async for i, delta in _merged(handles):
            deltas[i].append(delta)
        return deltas

    return await _unless_client_gone(request, gather(), handles)


class EventStream(StreamingResponse):
    """Server-Sent Events whose engine requests are cancelled however the response
    ends: finished, the client gone, or the server stopping. The slots free at once."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], handles: list):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles = handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self.handles)
            await self.body_iterator.aclose()


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _stream_error(message: str) -> str:
    return _sse(InternalError(message).body())


# ---- OpenAI objects ----------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finite(logprob: float) -> float:
    """JSON has no -Infinity: an impossible token gets -9999, as OpenAI-compatible
    servers report it."""
    return max(logprob, -9999.0) if logprob == logprob else -9999.0


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`"""

    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {
                **item(e.token, e.logprob),
                "top_logprobs": [item(t.token, t.logprob) for t in e.top_logprobs],
            }
            for e in entries
        ]
    }


# A completions logprob entry: (token text, its logprob, {alternative: logprob}); the
# first prompt token, echoed, has neither.
Entry = tuple[str, float | None, dict[str, float] | None]


def completion_entries(logprobs: list[TokenLogprob]) -> list[Entry]:
    return [
        (e.token, _finite(e.logprob), {t.token: _finite(t.logprob) for t in e.top_logprobs})
        for e in logprobs
    ]


def completion_logprobs(entries: list[Entry], text_offset: int = 0) -> dict:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; offsets count
    characters into the choice's text, from `text_offset` (where a stream chunk starts)."""
    offsets = []
    for token, _, _ in entries:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": [token for token, _, _ in entries],
        "token_logprobs": [logprob for _, logprob, _ in entries],
        "top_logprobs": [top for _, _, top in entries],
        "text_offset": offsets,
    }


# ---- the routes ---------------------------------------------------------------------------


def build_routes(service: Service) -> list[Route]:
    engine, tokenizer = service.engine, service.tokenizer

    async def list_models(request: Request):
        service.authorize(request)
        cards = [service.model_card(name) for name in service.names]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(request: Request):
        service.authorize(request)
        model_id = request.path_params["model_id"]
        service.check_model(model_id)
        return JSONResponse(service.model_card(model_id))

    async def metrics(request: Request):
        # Open even with a key, as vLLM's is: it shows counts, never a prompt or a text.
        return Response(service.metrics.exposition(engine), media_type=CONTENT_TYPE)

    def chat_prompt(body: ChatCompletionRequest) -> list[int]:
        if not engine.model.chat_template:
            raise BadRequest(
                "messages: this model has no chat template (it is a base model); send a "
                "plain prompt to /openai/completions instead",
                "messages",
                "no_chat_template",
            )
        try:
            rendered = render_chat(tokenizer, body.conversation())
        except Exception as error:  # the template's own checks, e.g. alternating roles
            raise BadRequest(
                f"messages: the model's chat template rejected them ({error})", "messages"
            ) from error
        return tokenizer.encode(rendered, add_special_tokens=False)

    async def chat_completions(request: Request):
        service.authorize(request)
        body = service.parse(ChatCompletionRequest, await service.read_json(request))
        renames = {"max_tokens": body.max_tokens_field}
        with fields_as_sent(renames):
            forecast = body.forecast_request(service.forecaster.sources)
        if forecast is not None:
            return await forecast_reply(request, body, forecast, renames)
        with fields_as_sent(renames):
            options = body.sampling_options()
        prompt_ids = await run_in_threadpool(chat_prompt, body)
        [handle] = service.submit([prompt_ids], options, renames)
        if body.stream:
            return EventStream(_chat_events(service, body, handle), [handle])
        deltas = await _all_deltas(request, [handle])
        if deltas is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        done = collect(deltas[0], handle.prompt_ids, body.n, options.logprobs)
        response = service.envelope("chatcmpl", "chat.completion")
        response["choices"] = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in done.choices
        ]
        response["usage"] = usage(done.usage.prompt_tokens, done.usage.completion_tokens)
        service.metrics.count_tokens(done.usage.prompt_tokens, done.usage.completion_tokens)
        return JSONResponse(response)

    async def forecast_reply(request: Request, body, forecast, renames: dict[str, str]):
        with fields_as_sent(renames):
            run = await run_in_threadpool(service.forecaster.run, forecast)
        if body.stream:
            return EventStream(_forecast_events(service, body, run), [run])
        result = await _unless_client_gone(request, _forecast_result(run, renames), [run])
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        response = service.envelope("chatcmpl", "chat.completion")
        response["choices"] = [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": result.content,
                    "thinking": result.thinking,
                    "annotations": _citations(result.sources, result.content),
                },
                "logprobs": None,
                "finish_reason": run.finish_reason,
            }
        ]
        response["usage"] = usage(result.usage.prompt_tokens, result.usage.completion_tokens)
        service.metrics.count_tokens(result.usage.prompt_tokens, result.usage.completion_tokens)
        return JSONResponse(response)

    def completion_prompts(body: CompletionRequest) -> list[list[int]]:
        prompts = []
        for i, prompt in enumerate(body.prompt):
            param = f"prompt.{i}" if len(body.prompt) > 1 else "prompt"
            if isinstance(prompt, str):
                prompts.append(tokenizer.encode(prompt))
            else:
                service.check_token_ids(prompt, param)
                prompts.append(list(prompt))
        return prompts

    async def completions(request: Request):
        service.authorize(request)
        body = service.parse(CompletionRequest, await service.read_json(request))
        renames = {"top_logprobs": "logprobs", "prompt_logprobs": "logprobs"}
        with fields_as_sent(renames):
            options = body.sampling_options()
        prompts = await run_in_threadpool(completion_prompts, body)
        handles = service.submit(prompts, options, renames)
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompt]
        if body.stream:
            return EventStream(_completion_events(service, body, handles, texts), handles)
        deltas = await _all_deltas(request, handles)
        if deltas is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        response = service.envelope("cmpl", "text_completion")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, handle in enumerate(handles):
            done = collect(deltas[i], handle.prompt_ids, body.n, options.logprobs)
            prompt_tokens += done.usage.prompt_tokens
            completion_tokens += done.usage.completion_tokens
            echoed = _echoed_prompt(service, handle) if body.echo and options.logprobs else []
            for c in done.choices:
                logprobs = None
                if c.logprobs is not None:
                    logprobs = completion_logprobs(echoed + completion_entries(c.logprobs))
                choices.append(
                    {
                        "index": i * body.n + c.index,
                        "text": texts[i] + c.text if body.echo else c.text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                )
        response["choices"] = choices
        response["usage"] = usage(prompt_tokens, completion_tokens)
        service.metrics.count_tokens(prompt_tokens, completion_tokens)
        return JSONResponse(response)

    return [
        Route("/openai/models", _guarded(list_models), methods=["GET"]),
        Route("/openai/models/{model_id:path}", _guarded(get_model), methods=["GET"]),
        Route("/openai/chat/completions", _guarded(chat_completions), methods=["POST"]),
        Route("/openai/completions", _guarded(completions), methods=["POST"]),
        Route(METRICS_PATH, _guarded(metrics), methods=["GET"]),
    ]


def _guarded(endpoint):
    """An unexpected failure becomes a 500 with the OpenAI body, answered like any other
    error (Starlette's last-resort handler would also drop the connection)."""

    @functools.wraps(endpoint)
    async def guarded(request: Request):
        try:
            return await endpoint(request)
        except (APIError, HTTPException):
            raise
        except Exception as error:
            log.exception("unexpected error on %s", request.url.path)
            raise InternalError(
                f"the server failed on this request ({type(error).__name__}: {error})"
            ) from error

    return guarded


def _echoed_prompt(service: Service, handle) -> list[Entry]:
    """The prompt's logprob entries for echo: the first token has none (nothing precedes it)."""
    entries: list[Entry] = []
    for token_id, entry in zip(handle.prompt_ids, handle.prompt_logprobs or [], strict=False):
        if entry is None:
            entries.append((service.tokenizer.decode([token_id]), None, None))
        else:
            entries.extend(completion_entries([entry]))
    return entries


async def _forecast_result(run: ForecastRun, renames: dict[str, str]):
    """Runs a forecast in a worker thread; the engine's refusals become 400 or 429."""
    try:
        with fields_as_sent(renames):
            return await run_in_threadpool(run.finish)
    except QueueFullError as error:
        raise TooManyRequests(str(error), error.retry_after) from error


def _citations(sources, content: str) -> list[dict]:
    """A forecast's sources as OpenAI `url_citation` annotations (each supports the whole
    answer)."""
    return [
        {
            "type": "url_citation",
            "url_citation": {
                "url": s.url,
                "title": s.title,
                "start_index": 0,
                "end_index": len(content),
            },
        }
        for s in sources
    ]


# ---- the streams ---------------------------------------------------------------------------


async def _forecast_events(
    service: Service, body: ChatCompletionRequest, run: ForecastRun
) -> AsyncIterator[str]:
    """A forecast as chat chunks: the thinking first (`delta.thinking`), then the content,
    then the sources (`delta.annotations`) with the finish_reason."""
    envelope = service.envelope("chatcmpl", "chat.completion.chunk")
    extra = {"usage": None} if body.include_usage else {}

    def chunk(delta: dict, finish_reason=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**envelope, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for kind, text in iterate_in_threadpool(run.events()):
            yield chunk({kind: text})
    except Exception as error:  # the engine refused or failed mid-stream: say so, in the stream
        log.exception("a forecast stream failed")
        yield _stream_error(f"the forecast failed: {error}")
        return
    result = run.result
    service.metrics.count_tokens(result.usage.prompt_tokens, result.usage.completion_tokens)
    yield chunk(
        {"annotations": _citations(result.sources, result.content)} if result.sources else {},
        finish_reason=run.finish_reason,
    )
    if body.include_usage:
        final = usage(result.usage.prompt_tokens, result.usage.completion_tokens)
        yield _sse({**envelope, "choices": [], "usage": final})
    yield _sse("[DONE]")


async def _chat_events(service: Service, body: ChatCompletionRequest, handle) -> AsyncIterator[str]:
    envelope = service.envelope("chatcmpl", "chat.completion.chunk")
    extra = {"usage": None} if body.include_usage else {}

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return _sse({**envelope, "choices": [choice], **extra})

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    completion_tokens = 0
    try:
        async for _, delta in _merged([handle]):
            if delta.finish_reason == "cancelled":  # not by this client: it is still here
                yield _stream_error("the server cancelled this request (it is shutting down)")
                return
            completion_tokens += len(delta.token_ids)
            logprobs = chat_logprobs(delta.logprobs) if delta.logprobs else None
            if delta.text or logprobs:
                yield chunk(delta.index, {"content": delta.text}, logprobs)
            if delta.finish_reason:
                yield chunk(delta.index, {}, finish_reason=delta.finish_reason)
    except Exception as error:  # the engine failed mid-stream: say so, in the stream
        log.exception("a chat stream failed")
        yield _stream_error(f"generation failed: {error}")
        return
    finally:  # however the stream ends: what it sent was generated
        service.metrics.count_tokens(len(handle.prompt_ids), completion_tokens)
    if body.include_usage:
        final = usage(len(handle.prompt_ids), completion_tokens)
        yield _sse({**envelope, "choices": [], "usage": final})
    yield _sse("[DONE]")


async def _completion_events(
    service: Service, body: CompletionRequest, handles: list, texts: list[str]
) -> AsyncIterator[str]:
    envelope = service.envelope("cmpl", "text_completion")
    extra = {"usage": None} if body.include_usage else {}

    def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> str:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return _sse({**envelope, "choices": [choice], **extra})

    wants_logprobs = body.logprobs is not None
    offsets: dict[int, int] = {}  # per choice: characters sent so far (for text_offset)
    prompt_tokens, completion_tokens = sum(len(h.prompt_ids) for h in handles), 0
    try:
        async for i, delta in _merged(handles):
            if delta.finish_reason == "cancelled":
                yield _stream_error("the server cancelled this request (it is shutting down)")
                return
            index = i * body.n + delta.index
            text = delta.text
            entries = completion_entries(delta.logprobs) if delta.logprobs else []
            if index not in offsets:  # the choice's first event
                offsets[index] = 0
                if body.echo:
                    text = texts[i] + text
                    if wants_logprobs:
                        entries = _echoed_prompt(service, handles[i]) + entries
            completion_tokens += len(delta.token_ids)
            if text or entries:
                logprobs = completion_logprobs(entries, offsets[index]) if wants_logprobs else None
                yield chunk(index, text, logprobs)
                offsets[index] += len(text)
            if delta.finish_reason:
                yield chunk(index, "", finish_reason=delta.finish_reason)
    except Exception as error:
        log.exception("a completion stream failed")
        yield _stream_error(f"generation failed: {error}")
        return
    finally:
        service.metrics.count_tokens(prompt_tokens, completion_tokens)
    if body.include_usage:
        yield _sse({**envelope, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield _sse("[DONE]")


# ---- the app ---------------------------------------------------------------------------------


def create_app(
    engine,
    api_key: str | None = None,
    served_model_name: str | Sequence[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    forecaster: Forecaster | None = None,
) -> Starlette:
    """The Foresight API over `engine`, at /openai, and its metrics at /metrics; no api_key
    means no authentication (/metrics never asks for one). forecaster: what answers
    `answer_type`, `reasoning_effort` and `research` (a lab's, with its research sources;
    by default one without sources)."""
    service = Service(
        engine, api_key, served_model_name or engine.model.name, max_body_bytes, forecaster
    )
    routes = build_routes(service)

    async def api_error(request: Request, error: APIError):
        return error.response()

    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            return NotFound(
                f"route: no {request.method} {request.url.path}; the API lives under /openai "
                "(/openai/chat/completions, /openai/completions, /openai/models)"
            ).response()
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            return MethodNotAllowed(
                f"method: {request.method} is not allowed on {request.url.path} (use {allowed})",
                allowed,
            ).response()
        kind = BadRequest if error.status_code < 500 else InternalError
        body = kind(str(error.detail)).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return InternalError(f"the server failed on this request: {error}").response()

    count = Middleware(CountRequests, metrics=service.metrics, routes=routes, skip=(METRICS_PATH,))
    return Starlette(
        routes=routes,
        middleware=[count],
        exception_handlers={
            APIError: api_error,
            HTTPException: http_error,
            Exception: unexpected,
        },
    )
