"""The ASGI layer in front of every route: request id, authentication, body checks, metrics and the request log.

In order, for each HTTP request:

1. the route it matches, as its template (``/v1/completions``; ``unmatched`` for a path no route has, so the
   metric's label values stay bounded however many paths are probed);
2. with API keys, every path but ``/health`` (and ``/metrics`` under ``--metrics-public``) needs a valid
   ``Authorization: Bearer`` key, unknown paths included: without one the answer is 401, never 404, so routes
   cannot be probed, and ``/ready`` never runs its canary for a caller without a key;
3. a POST to a route must say ``Content-Type: application/json`` (parameters allowed), else 415: a web page
   can send a ``text/plain`` POST to a keyless local server without a CORS preflight, not a JSON one;
4. a body over ``max_request_bytes`` is 413, by its ``Content-Length`` or as it arrives (reading stops
   there), and a body not complete ``body_timeout_s`` after the headers is 408; both answers close the
   connection, so the rest of the upload is never read;
5. a client that leaves before its answer (while uploading, or while a non-streamed answer is computed) counts
   as 499 with one log line and no traceback: that is the client's doing, not a fault;
6. an exception no handler answered is a 500 in OpenAI's shape, logged with the request id (without its
   message, which may quote the request).

When the response is complete (a stream included), ``dist_infer_requests_total{endpoint,status,key}`` counts it
and the request log writes its line.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import ClientDisconnect
from starlette.routing import Match

from dist_infer.entrypoints.openai.auth import NO_KEY, UNAUTHENTICATED, APIKeys
from dist_infer.entrypoints.openai.errors import OpenAIError, error_response
from dist_infer.entrypoints.openai.request_log import RequestLog, RequestRecord, request_id_from

UNMATCHED = "unmatched"
CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection before the answer"
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_CLOSE = {"Connection": "close"}  # the unread rest of a refused upload is not worth reading


class ServerMiddleware:
    def __init__(self, app, *, routes, keys: APIKeys, open_paths: set[str], max_request_bytes: int, metrics,
                 request_log: RequestLog, body_timeout_s: float | None = None):
        self.app, self.routes, self.keys, self.open_paths = app, routes, keys, open_paths
        self.max_request_bytes, self.metrics, self.request_log = max_request_bytes, metrics, request_log
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        endpoint, matched = self._route(scope)
        client = scope.get("client")
        record = RequestRecord(request_id_from(headers.get("x-request-id")), scope["method"], endpoint,
                               client[0] if client else None, capture_text=self.request_log.log_requests)
        scope.setdefault("state", {}).update(request_id=record.request_id, record=record)
        started = False

        async def send_wrapper(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": raw + [(b"x-request-id", record.request_id.encode())]}
            await send(message)

        try:
            rejection = self._check(scope, headers, record, matched)
            if rejection is not None:
                record.note_error(json.loads(rejection.body)["error"]["code"])
                await rejection(scope, receive, send_wrapper)
                return
            try:
                await self.app(scope, self._limited(receive), send_wrapper)
            except ClientDisconnect:  # it left while uploading or waiting: nobody to answer, nothing to trace
                record.note_error("client_disconnected")
            except Exception as e:  # a real fault: logged with the id, answered in OpenAI's shape if still possible
                self.request_log.exception(f"request {record.request_id} to {endpoint} failed", e)
                record.note_error("internal_error")
                if not started:
                    await error_response(500, f"internal error (request id {record.request_id})",
                                         code="internal_error")(scope, receive, send_wrapper)
        finally:
            if record.status is None:  # the client left before an answer
                record.status = CLIENT_CLOSED
            self.metrics.count_response(endpoint, record.status, record.key)
            self.request_log.finished(record)

    def _route(self, scope) -> tuple[str, bool]:
        """The template of the route the path matches and whether the method matches too."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path, True
            if match == Match.PARTIAL and partial is None:
                partial = route.path
        return (partial, False) if partial is not None else (UNMATCHED, False)

    def _check(self, scope, headers: dict, record: RequestRecord, matched: bool):
        """An error response for a request that must not reach its route, else None."""
        if self.keys.enabled:
            name = self.keys.identify(headers.get("authorization"))
            record.key = name or UNAUTHENTICATED
            if name is None and not (matched and record.endpoint in self.open_paths):
                missing = "authorization" not in headers
                return error_response(401, "Missing API key" if missing else "Incorrect API key provided",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        else:
            record.key = NO_KEY
        if matched and scope["method"] in _BODY_METHODS:
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                given = f"'{media_type}'" if media_type else "none"
                return error_response(415, f"the body must be JSON sent as Content-Type: application/json "
                                           f"(got {given})", code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return error_response(413, f"request body of {length} bytes exceeds the limit of "
                                       f"{self.max_request_bytes}", code="request_too_large", headers=_CLOSE)
        return None

    def _limited(self, receive):
        """``receive`` that refuses a body growing past the limit (a chunked upload has no Content-Length) and
        one still incomplete ``body_timeout_s`` after the headers (a client trickling it in to hold a slot).
        Once the body is complete it passes messages through untimed (the disconnect watch waits on it)."""
        limit, seen, complete = self.max_request_bytes, 0, False
        deadline = time.monotonic() + self.body_timeout_s if self.body_timeout_s else None

        async def wrapped():
            nonlocal seen, complete
            if complete or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise OpenAIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                      code="request_timeout", headers=_CLOSE) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes",
                                      code="request_too_large", headers=_CLOSE)
                complete = not message.get("more_body", False)
            return message

        return wrapped


def _headers(scope) -> dict[str, str]:
    """The request's headers, lower-cased names; a repeated header keeps its first value."""
    out: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        out.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return out
