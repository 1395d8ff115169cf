"""Serving from a notebook or a script: uvicorn's Server in a background thread.

`uvicorn.run` wants to run its own event loop in the calling thread, and a Jupyter
kernel already runs one there; a thread with its own loop leaves the kernel free (and
the notebook usable) while the server answers. The listening socket is bound here, in
the caller's thread, so a port in use fails at once and port 0 reads back at once.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import warnings
from collections.abc import Sequence

import uvicorn

from foresight_lab.server.routes import DEFAULT_MAX_BODY_BYTES, create_app


class ServerHandle:
    """A running server: `url`, `base_url` (for OpenAI clients), `stop()`; a context manager."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int):
        self._server, self._thread = server, thread
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes: `OpenAI(base_url=server.base_url, api_key=...)`."""
        return f"{self.url}/openai"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        """Stops accepting connections, lets open requests finish (streams for a few
        seconds), and joins the server's thread. Calling it again does nothing."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.base_url!r}, running={self.running})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, api_key: str | None) -> None:
    if not api_key and not _is_loopback(host):
        warnings.warn(
            f"serving on {host} without an API key: anyone who can reach this address can use "
            "the model; pass api_key= (or --api-key, or FORESIGHT_LAB_API_KEY)",
            UserWarning,
            stacklevel=3,
        )


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket, as uvicorn would bind it; raises OSError (port in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | Sequence[str] | None = None,
    *,
    forecaster=None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "warning",
    startup_timeout: float = 30,
    shutdown_timeout: float = 5,
) -> ServerHandle:
    """Starts serving `engine` in a background thread; returns once it accepts
    connections. port=0 picks a free port (the handle's `port` says which).

    On `stop()`, open requests get `shutdown_timeout` seconds to finish; then they are
    cut off and their generations cancelled.
    """
    warn_if_open(host, api_key)
    app = create_app(
        engine,
        api_key=api_key,
        served_model_name=served_model_name,
        forecaster=forecaster,
        max_body_bytes=max_body_bytes,
    )
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=shutdown_timeout,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"foresight-server-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(startup_timeout)
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    return ServerHandle(server, thread, host, port)
