"""The HTTP adapter: the Foresight (OpenAI-compatible) API over an engine."""

from foresight_lab.server.routes import create_app
from foresight_lab.server.serve import ServerHandle, serve

__all__ = ["ServerHandle", "create_app", "serve"]
