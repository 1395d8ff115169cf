"""Serving from a notebook or a script: uvicorn's Server in a background thread.

`uvicorn.run` wants the calling thread's event loop, which a Jupyter kernel already
runs; a thread with its own loop leaves the kernel free while the server answers.
"""

from __future__ import annotations

import ipaddress
import threading
import time
import warnings

import uvicorn

from foresight_lab.server.routes import create_app


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
        return f"{self.url}/openai"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        """Stops accepting requests, finishes the open ones, and joins the thread."""
        self._server.should_exit = True
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
            stacklevel=3,
        )


def serve(
    engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    log_level: str = "warning",
    startup_timeout: float = 30,
) -> ServerHandle:
    """Starts serving `engine` in a background thread; returns once it accepts connections."""
    warn_if_open(host, api_key)
    app = create_app(engine, api_key=api_key, served_model_name=served_model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # older uvicorn; newer ones check the thread
    thread = threading.Thread(target=server.run, name=f"foresight-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server could not start on {host}:{port} (is the port in use?)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(
                f"the server did not start on {host}:{port} within {startup_timeout} s"
            )
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return ServerHandle(server, thread, host, bound)
