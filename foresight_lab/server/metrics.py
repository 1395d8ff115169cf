"""What `GET /metrics` reports, in Prometheus's text format (version 0.0.4).

    # HELP foresight_requests_total HTTP requests answered, by route and status class.
    # TYPE foresight_requests_total counter
    foresight_requests_total{route="/openai/chat/completions",status="2xx"} 12

The server counts requests and tokens here; the engine's own figures (queue depth,
active slots, compilations) are read from it at each scrape, so they are never stale.
"""

from __future__ import annotations

import collections
import re
import threading

from starlette.routing import BaseRoute, Match

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER_ROUTE = "other"  # every path that matches no route: one label, however many paths


class Metrics:
    """The server's counters. Only ever rise; a new app starts them at zero."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self._prompt_tokens = 0
        self._completion_tokens = 0

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[route, f"{status // 100}xx"] += 1

    def count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens

    def exposition(self, engine) -> str:
        """The text a Prometheus server scrapes: the counters, and the engine's figures now."""
        with self._lock:
            requests = sorted(self._requests.items())
            prompt_tokens, completion_tokens = self._prompt_tokens, self._completion_tokens
        families = [
            (
                "foresight_requests_total",
                "counter",
                "HTTP requests answered, by route and status class.",
                [({"route": route, "status": status}, n) for (route, status), n in requests],
            ),
            (
                "foresight_prompt_tokens_total",
                "counter",
                "Prompt tokens of the completions answered (each prompt once).",
                [({}, prompt_tokens)],
            ),
            (
                "foresight_completion_tokens_total",
                "counter",
                "Tokens generated for the completions answered (every choice).",
                [({}, completion_tokens)],
            ),
            (
                "foresight_queue_depth",
                "gauge",
                "Requests waiting in the engine's queue for slots.",
                [({}, engine.queue_depth)],
            ),
            (
                "foresight_active_slots",
                "gauge",
                "Engine slots decoding a sequence now (each choice takes one).",
                [({}, engine.active_slots)],
            ),
            (
                "foresight_max_slots",
                "gauge",
                "Engine slots in all (--max-slots).",
                [({}, engine.config.max_slots)],
            ),
            (
                "foresight_kv_cache_bytes",
                "gauge",
                "Bytes the KV cache is allocated at (slots x positions, --kv-cache-dtype).",
                [({}, engine.kv_cache_bytes())],
            ),
            (
                "foresight_compilations_total",
                "counter",
                "Compilations the engine has triggered (flat after warm-up).",
                [({}, engine.compile_count)],
            ),
        ]
        return "".join(_family(*family) for family in families)


def _family(name: str, kind: str, meaning: str, samples: list[tuple[dict[str, str], int]]) -> str:
    lines = [f"# HELP {name} {meaning}\n", f"# TYPE {name} {kind}\n"]
    for labels, value in samples:
        shown = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
        lines.append(f"{name}{{{shown}}} {value}\n" if shown else f"{name} {value}\n")
    return "".join(lines)


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def route_label(path_template: str) -> str:
    """`/openai/models/{model_id:path}` as `/openai/models/{model_id}`: the template, not
    the path asked for, so that labels stay few."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path_template)


class CountRequests:
    """ASGI middleware: counts every HTTP response as it starts, under the route it matched
    (its template) and its status class; a failure before any response counts as 5xx.
    Paths in `skip` (the scrapes themselves) are not counted."""

    def __init__(self, app, metrics: Metrics, routes: list[BaseRoute], skip: tuple[str, ...]):
        self.app, self.metrics, self.routes, self.skip = app, metrics, routes, skip

    def _route(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path matches, the method does not
                return route_label(getattr(route, "path", OTHER_ROUTE))
        return OTHER_ROUTE

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip:
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        started = False

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.count_request(route, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # the last-resort handler outside this middleware answers 500
                self.metrics.count_request(route, 500)
            raise
