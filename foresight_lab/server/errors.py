"""Errors as the OpenAI API reports them: one small family, mapped to status codes here.

Every error body is `{"error": {"message", "type", "param", "code"}}`, and the message
names the field at fault.
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
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type = 401, "invalid_request_error"

    def headers(self):
        return {"WWW-Authenticate": "Bearer"}


class NotFound(APIError):
    status, type = 404, "invalid_request_error"


class MethodNotAllowed(APIError):
    status, type = 405, "invalid_request_error"


class PayloadTooLarge(APIError):
    status, type = 413, "invalid_request_error"


class TooManyRequests(APIError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after

    def headers(self):
        return {"Retry-After": str(self.retry_after)}


class InternalError(APIError):
    status, type = 500, "server_error"
