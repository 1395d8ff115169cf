"""A submitted request as its caller holds it: a stream of Delta events.

The scheduler thread puts events; the caller reads them either from plain Python
(`for delta in handle`) or from an event loop (`async for delta in handle`), which
never blocks the loop: events are handed over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from foresight_lab.engine.request import (
    Completion,
    Delta,
    SamplingOptions,
    TokenLogprob,
    collect,
)

DONE = object()  # the last event of every request


class EngineError(RuntimeError):
    """The engine failed while running a request (not the request's fault)."""


class RequestHandle:
    """A submitted request: iterate it (sync or async) for Delta events, or wait for result()."""

    def __init__(self, prompt_ids: list[int], options: SamplingOptions, seed: int, max_tokens: int):
        self.prompt_ids = prompt_ids
        self.options = options
        self.seed = seed
        self.max_tokens = max_tokens
        # With options.prompt_logprobs: one entry per prompt token (None for the first),
        # set before the first Delta is delivered.
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None
        self._consumed = False

    # ---- the scheduler's side ------------------------------------------------------

    def put(self, event) -> None:
        """Delivers an event (a Delta, DONE, or an exception) to whoever reads."""
        with self._lock:
            if self._loop is None:
                self._events.put(event)
                return
            loop, events = self._loop, self._async_events
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the reader's loop is closed: nobody is listening
            self.cancelled.set()

    # ---- the caller's side -------------------------------------------------------

    def _claim(self) -> None:
        if self._consumed:
            raise RuntimeError("a request's events can be read only once")
        self._consumed = True

    @staticmethod
    def _unwrap(event):
        if isinstance(event, BaseException):
            raise EngineError(f"generation failed: {event}") from event
        return event

    def __iter__(self) -> Iterator[Delta]:
        self._claim()
        while (event := self._events.get()) is not DONE:
            yield self._unwrap(event)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        with self._lock:
            self._claim()
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
            while not self._events.empty():  # events that arrived before we listened
                self._async_events.put_nowait(self._events.get_nowait())
        while (event := await self._async_events.get()) is not DONE:
            yield self._unwrap(event)

    def result(self) -> Completion:
        """Waits for every choice to finish."""
        completion = collect(self, self.prompt_ids, self.options.n, self.options.logprobs)
        completion.prompt_logprobs = self.prompt_logprobs
        return completion

    async def aresult(self) -> Completion:
        """Waits for every choice to finish, without blocking the event loop."""
        deltas = [delta async for delta in self]
        completion = collect(deltas, self.prompt_ids, self.options.n, self.options.logprobs)
        completion.prompt_logprobs = self.prompt_logprobs
        return completion

    def cancel(self) -> None:
        """Stops generating; the slots are freed before the next decode step."""
        self.cancelled.set()
