"""Errors as the OpenAI API reports them: one small family, mapped to status codes here.

Every error body is `{"error": {"message", "type", "param", "code"}}`, and the message
names the field at fault. Routes raise these; one exception handler turns any of them
into its response.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class APIError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(APIError):
    """Wrong type, range or shape of a field, or a body that is not a JSON object."""

    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type = 401, "invalid_request_error"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")

    def headers(self):
        return {"WWW-Authenticate": "Bearer"}


class NotFound(APIError):
    status, type = 404, "invalid_request_error"


class MethodNotAllowed(APIError):
    status, type = 405, "invalid_request_error"

    def __init__(self, message: str, allowed: str):
        super().__init__(message, code="method_not_allowed")
        self.allowed = allowed

    def headers(self):
        return {"Allow": self.allowed}


class PayloadTooLarge(APIError):
    status, type = 413, "invalid_request_error"

    def __init__(self, limit: int):
        super().__init__(
            f"request body: larger than the server's limit of {limit} bytes", code="body_too_large"
        )


class UnsupportedMediaType(APIError):
    status, type = 415, "invalid_request_error"


class TooManyRequests(APIError):
    """The engine's queue is full; clients (the openai package among them) retry after
    Retry-After seconds."""

    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after

    def headers(self):
        return {"Retry-After": str(self.retry_after)}


class InternalError(APIError):
    """The server failed on a valid request; the server itself keeps running."""

    status, type = 500, "server_error"
