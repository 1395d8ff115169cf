"""The Starlette app: parse and validate, call the engine, format OpenAI objects, stream SSE.

    POST /openai/chat/completions   chat.completion (or chat.completion.chunk events)
    POST /openai/completions        text_completion
    GET  /openai/models             the served model
    GET  /openai/models/{id}

It never touches jax arrays: the engine's narrow interface (`submit`, request handles
iterated with `async for`) is all it uses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator

import pydantic
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from foresight_lab.engine.handle import RequestHandle
from foresight_lab.engine.request import (
    Completion,
    Delta,
    InvalidRequestError,
    QueueFullError,
    SamplingOptions,
    TokenLogprob,
    collect,
)
from foresight_lab.server.errors import (
    APIError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
)
from foresight_lab.server.schema import ChatCompletionRequest, CompletionRequest
from foresight_lab.tokenizer import render_chat

log = logging.getLogger("foresight_lab.server")
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


class Service:
    """What the routes share: the engine, the served name, the key and the limits."""

    def __init__(self, engine, api_key: str | None, served_model_name: str, max_body_bytes: int):
        self.engine = engine
        self.api_key = api_key
        self.model = served_model_name
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    # ---- request side ------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized(
                "Authorization: missing API key; send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise Unauthorized("Authorization: incorrect API key", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body: larger than {self.max_body_bytes} bytes")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.max_body_bytes:
                raise PayloadTooLarge(f"request body: larger than {self.max_body_bytes} bytes")
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"request body: not valid JSON ({error})") from error
        if not isinstance(value, dict):
            raise BadRequest("request body: must be a JSON object")
        return value

    def parse(self, schema: type[pydantic.BaseModel], body: dict):
        try:
            parsed = schema.model_validate(body)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            raise BadRequest(f"{param}: {first['msg']}", param) from error
        if parsed.model != self.model:
            raise NotFound(
                f"model: {parsed.model!r} is not served here; this server serves {self.model!r}",
                "model",
                "model_not_found",
            )
        return parsed

    def submit(self, prompt_ids: list[int], options: SamplingOptions) -> RequestHandle:
        try:
            return self.engine.submit(prompt_ids, options)
        except QueueFullError as error:
            raise TooManyRequests(str(error), error.retry_after) from error

    # ---- response side -----------------------------------------------------------

    def envelope(self, prefix: str, kind: str) -> dict:
        return {
            "id": f"{prefix}-{secrets.token_hex(12)}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": None,
        }

    def model_card(self) -> dict:
        context = self.engine.config.max_cache_length
        return {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "foresight-lab",
            "root": self.model,
            "max_model_len": context,
            "context_length": context,
            "max_completion_tokens": context - 1,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprob(entry: TokenLogprob) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        **item(entry.token, entry.logprob),
        "top_logprobs": [item(t.token, t.logprob) for t in entry.top_logprobs],
    }


def _completion_logprobs(entries: list[TokenLogprob | None], start_offset: int = 0) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    offset = start_offset
    for entry in entries:
        if entry is None:  # the first prompt token has no logprob
            continue
        tokens.append(entry.token)
        values.append(entry.logprob)
        tops.append({t.token: t.logprob for t in entry.top_logprobs})
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


async def _until_done_or_gone(request: Request, handle: RequestHandle) -> Completion:
    """Waits for a whole completion; a client that hangs up cancels it."""
    result = asyncio.ensure_future(handle.aresult())
    while True:
        done, _ = await asyncio.wait({result}, timeout=0.5)
        if done:
            return result.result()
        if await request.is_disconnected():
            handle.cancel()


async def _merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Delta]]:
    """(which handle, delta) from several requests as they come; all are cancelled if
    the consumer stops early."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle):
        try:
            async for delta in handle:
                await queue.put((i, delta))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, delta = await queue.get()
            if delta is None:
                remaining -= 1
            else:
                yield i, delta
        for task in tasks:
            task.result()  # surface an engine failure
    finally:
        for handle in handles:
            handle.cancel()
        for task in tasks:
            task.cancel()


def _stream_failure(what: str, error: Exception) -> str:
    log.exception(what)
    return _sse(InternalError(f"{what}: {error}").body())


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def build_routes(service: Service) -> list[Route]:
    engine = service.engine

    async def list_models(request: Request):
        service.authorize(request)
        return JSONResponse({"object": "list", "data": [service.model_card()]})

    async def get_model(request: Request):
        service.authorize(request)
        model_id = request.path_params["model_id"]
        if model_id != service.model:
            raise NotFound(f"model: {model_id!r} is not served here", "model", "model_not_found")
        return JSONResponse(service.model_card())

    async def chat_completions(request: Request):
        service.authorize(request)
        body = service.parse(ChatCompletionRequest, await service.read_json(request))
        options = body.sampling_options()
        try:
            rendered = render_chat(engine.tokenizer, body.conversation())
        except ValueError as error:  # no chat template (a base model)
            raise BadRequest(
                f"messages: {error}; or use /openai/completions", "messages"
            ) from error
        except Exception as error:  # a template that rejects these messages
            raise BadRequest(
                f"messages: the chat template rejected them ({error})", "messages"
            ) from error
        prompt_ids = engine.tokenizer.encode(rendered, add_special_tokens=False)
        handle = service.submit(prompt_ids, options)
        if body.stream:
            return StreamingResponse(
                _chat_events(service, body, handle), media_type="text/event-stream"
            )
        completion = await _until_done_or_gone(request, handle)
        response = service.envelope("chatcmpl", "chat.completion")
        response["choices"] = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": [_chat_logprob(e) for e in c.logprobs]}
                if c.logprobs is not None
                else None,
                "finish_reason": c.finish_reason,
            }
            for c in completion.choices
        ]
        response["usage"] = usage(
            completion.usage.prompt_tokens, completion.usage.completion_tokens
        )
        return JSONResponse(response)

    async def completions(request: Request):
        service.authorize(request)
        body = service.parse(CompletionRequest, await service.read_json(request))
        options = body.sampling_options()
        prompts = body.prompts()
        prompt_ids = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                prompt_ids.append(engine.tokenizer.encode(prompt))
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                prompt_ids.append(list(prompt))
            else:
                raise BadRequest(
                    f"prompt.{i}: must be a string or a list of token ids", f"prompt.{i}"
                )
        handles = []
        try:
            for ids in prompt_ids:
                handles.append(service.submit(ids, options))
        except (APIError, InvalidRequestError):
            for handle in handles:
                handle.cancel()
            raise
        texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]
        if body.stream:
            return StreamingResponse(
                _completion_events(service, body, handles, texts), media_type="text/event-stream"
            )
        deltas: list[list[Delta]] = [[] for _ in handles]
        try:
            async for i, delta in _merged(handles):
                deltas[i].append(delta)
                if await request.is_disconnected():
                    break
        finally:
            for handle in handles:
                handle.cancel()
        response = service.envelope("cmpl", "text_completion")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (handle, events) in enumerate(zip(handles, deltas, strict=True)):
            done = collect(events, handle.prompt_ids, body.n, options.logprobs)
            prompt_tokens += done.usage.prompt_tokens
            completion_tokens += done.usage.completion_tokens
            for c in done.choices:
                text, entries = c.text, c.logprobs
                if body.echo:
                    text = texts[i] + text
                    if entries is not None:
                        entries = (handle.prompt_logprobs or []) + entries
                choices.append(
                    {
                        "index": i * body.n + c.index,
                        "text": text,
                        "logprobs": _completion_logprobs(entries) if entries is not None else None,
                        "finish_reason": c.finish_reason,
                    }
                )
        response["choices"] = choices
        response["usage"] = usage(prompt_tokens, completion_tokens)
        return JSONResponse(response)

    return [
        Route("/openai/models", list_models, methods=["GET"]),
        Route("/openai/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/openai/chat/completions", chat_completions, methods=["POST"]),
        Route("/openai/completions", completions, methods=["POST"]),
    ]


async def _chat_events(service: Service, body: ChatCompletionRequest, handle: RequestHandle):
    envelope = service.envelope("chatcmpl", "chat.completion.chunk")
    extra = {"usage": None} if body.include_usage else {}

    def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
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
            if delta.finish_reason == "cancelled":
                return
            completion_tokens += len(delta.token_ids)
            logprobs = None
            if delta.logprobs is not None:
                logprobs = {"content": [_chat_logprob(e) for e in delta.logprobs]}
            if delta.text or logprobs:
                yield chunk(delta.index, {"content": delta.text}, logprobs=logprobs)
            if delta.finish_reason:
                yield chunk(delta.index, {}, delta.finish_reason)
    except Exception as error:  # the engine failed mid-stream: say so, in the stream
        yield _stream_failure("chat stream failed", error)
        return
    if body.include_usage:
        yield _sse(
            {**envelope, "choices": [], "usage": usage(len(handle.prompt_ids), completion_tokens)}
        )
    yield _sse("[DONE]")


async def _completion_events(
    service: Service, body: CompletionRequest, handles: list[RequestHandle], texts: list[str]
):
    envelope = service.envelope("cmpl", "text_completion")
    extra = {"usage": None} if body.include_usage else {}

    def chunk(index: int, text: str, finish_reason=None, logprobs=None) -> str:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return _sse({**envelope, "choices": [choice], **extra})

    completion_tokens = 0
    started: set[int] = set()
    try:
        async for i, delta in _merged(handles):
            if delta.finish_reason == "cancelled":
                return
            index = i * body.n + delta.index
            text, entries = delta.text, list(delta.logprobs) if delta.logprobs else None
            if body.echo and index not in started:
                text = texts[i] + text
                if entries is not None:
                    entries = (handles[i].prompt_logprobs or []) + entries
            started.add(index)
            completion_tokens += len(delta.token_ids)
            logprobs = _completion_logprobs(entries) if entries is not None else None
            if text or logprobs:
                yield chunk(index, text, logprobs=logprobs)
            if delta.finish_reason:
                yield chunk(index, "", delta.finish_reason)
    except Exception as error:  # the engine failed mid-stream: say so, in the stream
        yield _stream_failure("completion stream failed", error)
        return
    if body.include_usage:
        prompt_tokens = sum(len(h.prompt_ids) for h in handles)
        yield _sse({**envelope, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield _sse("[DONE]")


def create_app(
    engine,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The Foresight API over `engine`, at /openai; no api_key means no authentication."""
    service = Service(engine, api_key, served_model_name or engine.model.name, max_body_bytes)

    async def api_error(request: Request, error: APIError):
        return error.response()

    async def invalid_request(request: Request, error: InvalidRequestError):
        return BadRequest(str(error), error.param).response()

    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            return NotFound(f"no route {request.url.path}; the API lives under /openai").response()
        if error.status_code == 405:
            return MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}"
            ).response()
        return JSONResponse(
            {
                "error": {
                    "message": str(error.detail),
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=error.status_code,
        )

    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return InternalError(f"the server failed on this request: {error}").response()

    return Starlette(
        routes=build_routes(service),
        exception_handlers={
            APIError: api_error,
            InvalidRequestError: invalid_request,
            HTTPException: http_error,
            Exception: unexpected,
        },
    )
