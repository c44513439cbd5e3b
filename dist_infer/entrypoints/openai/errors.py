"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}
_CODES = {404: "not_found", 405: "method_not_allowed"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc) -> OpenAIError:
    """The first pydantic error as a 400 naming the field."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = first.get("msg", "invalid request")
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def http_error(request, exc) -> JSONResponse:
    """Starlette's own errors (no route: 404; a route without that method: 405) in OpenAI's shape, not
    FastAPI's ``{"detail": ...}``."""
    status = exc.status_code
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow")
        message = f"Method {request.method} is not allowed on {request.url.path}" + \
            (f" (allowed: {allowed})" if allowed else "")
    else:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(status, message, code=http_error_code(status), headers=exc.headers)


def http_error_code(status: int) -> str | None:
    return _CODES.get(status)
