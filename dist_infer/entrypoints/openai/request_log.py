"""The server's log: one line per finished request, and nothing a request said.

Each request ends in one line on the ``dist_infer.server`` logger at INFO (``--log-level info`` shows them;
``/health`` and ``/metrics`` answers at DEBUG, so probes and scrapes stay quiet)::

    request id=9f2c... method=POST endpoint=/v1/chat/completions status=200 key=alice client=10.0.0.7
        prompt_tokens=31 completion_tokens=20 ttft_s=0.041 duration_s=0.512

(one line in the log; an error answer adds ``error=CODE[:PARAM]``, e.g. ``error=invalid_value:max_tokens``.)

The endpoint is the route template (``unmatched`` for paths no route has), the key is the key's name. No
prompt, completion or key text is logged unless ``--log-requests`` asks for it, and then masked (see
``redact``). Exceptions are logged with their traceback but without their message, which can quote the
request (a validation error echoing the input, say); with ``--log-requests`` the message is logged masked.
uvicorn's own access log is off: it would log raw paths and query strings. Every line that reaches the
server's log handler has the server's own keys masked, whichever library wrote it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from dist_infer.entrypoints.openai.redact import Redactor

logger = logging.getLogger("dist_infer.server")

_QUIET_ENDPOINTS = {"/health", "/metrics"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(header: str | None) -> str:
    """The client's ``x-request-id`` when it is a plain token (it goes into logs), else a fresh id."""
    return header if header and _REQUEST_ID.fullmatch(header) else uuid.uuid4().hex


@dataclass
class RequestRecord:
    """What one request did, filled in as it runs and logged when it finishes."""

    request_id: str
    method: str
    endpoint: str
    client: str | None = None
    key: str = "none"
    capture_text: bool = False  # --log-requests: keep the prompt and completion text for the log line
    status: int | None = None
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    error: str | None = None  # the error's code and parameter name (never its message, which may quote the input)
    prompts: list[str] | None = None
    completions: list[str] | None = None

    def note_error(self, code: str | None, param: str | None = None) -> None:
        self.error = ":".join(x for x in (code, param) if x) or None


class RequestLog:
    def __init__(self, log_requests: bool, redactor: Redactor):
        self.log_requests, self.redactor = log_requests, redactor
        # Errors whose traceback is already in the log, by identity, oldest first. One engine failure is raised
        # into every stream it ends; each raise of the same object lengthens its traceback, so logging each in
        # full would grow the log quadratically with the number of streams.
        self._logged: OrderedDict[int, tuple[BaseException, str]] = OrderedDict()

    def finished(self, record: RequestRecord) -> None:
        quiet = record.endpoint in _QUIET_ENDPOINTS and record.status is not None and record.status < 400
        level = logging.DEBUG if quiet else logging.INFO
        if not logger.isEnabledFor(level):
            return
        parts = [f"id={record.request_id}", f"method={record.method}", f"endpoint={record.endpoint}",
                 f"status={record.status if record.status is not None else 'none'}", f"key={record.key}"]
        if record.client:
            parts.append(f"client={record.client}")
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(record, name)
            if value is not None:
                parts.append(f"{name}={value}")
        if record.error:
            parts.append(f"error={record.error}")
        if record.ttft_s is not None:
            parts.append(f"ttft_s={record.ttft_s:.3f}")
        parts.append(f"duration_s={time.monotonic() - record.started:.3f}")
        if self.log_requests:
            if record.prompts is not None:
                parts.append("prompt=" + json.dumps([self.redactor(t) for t in record.prompts], ensure_ascii=False))
            if record.completions is not None:
                parts.append("completion=" + json.dumps([self.redactor(t) for t in record.completions],
                                                        ensure_ascii=False))
        logger.log(level, "request %s", " ".join(parts))

    def exception(self, what: str, exc: BaseException) -> None:
        """``what`` failed: logged at ERROR with the traceback, the messages hidden (masked with --log-requests).
        An error (or a cause of it) already logged gets one line pointing at the first report instead."""
        chain = _chain(exc)
        for e in chain:
            seen = self._logged.get(id(e))
            if seen is not None and seen[0] is e:
                logger.error("%s: %s (the same error as %s; traceback logged there)", what, _type_name(exc), seen[1])
                return
        logger.error("%s\n%s", what, format_exception(exc, self.redactor if self.log_requests else None))
        for e in chain:
            self._logged[id(e)] = (e, what)
        while len(self._logged) > _MAX_REMEMBERED:
            self._logged.popitem(last=False)


_MAX_REMEMBERED = 64


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes / contexts, outermost first."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return chain


def _type_name(e: BaseException) -> str:
    return type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"


def format_exception(exc: BaseException, redactor: Redactor | None = None) -> str:
    """A traceback (frames and exception types) whose messages are hidden, or masked by ``redactor``."""
    chain = _chain(exc)
    lines: list[str] = []
    for i, e in enumerate(reversed(chain)):
        if i:
            lines.append("\nwhich led to:\n\n")
        lines.append("Traceback (most recent call last):\n")
        lines.extend(traceback.format_list(traceback.extract_tb(e.__traceback__)))
        text = str(e)
        if redactor is not None:
            message = redactor(text)
        else:
            message = f"<message hidden ({len(text)} chars); --log-requests logs it masked>" if text else ""
        name = _type_name(e)
        lines.append(f"{name}: {message}\n" if message else f"{name}\n")
    return "".join(lines).rstrip("\n")


class PrivacyFilter(logging.Filter):
    """On the server's log handler: the server's keys masked out of every record, and a traceback attached by
    any library (uvicorn's "Exception in ASGI application", say) rewritten without its messages."""

    def __init__(self, redactor: Redactor, log_requests: bool):
        super().__init__()
        self.redactor, self.log_requests = redactor, log_requests

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: keep the template only
            message = str(record.msg)
        record.msg, record.args = self.redactor.keys_only(message), None
        if record.exc_info and record.exc_info[1] is not None:
            text = format_exception(record.exc_info[1], self.redactor if self.log_requests else None)
            record.exc_info, record.exc_text = None, self.redactor.keys_only(text)
        elif record.exc_text:
            record.exc_text = self.redactor.keys_only(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.keys_only(record.stack_info)
        return True


_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG}


def configure_logging(level: str, log_requests: bool, redactor: Redactor) -> None:
    """One stderr handler, behind the privacy filter, for this package's loggers and uvicorn's. The request lines
    follow ``level``; ``--log-requests`` shows them (INFO) even when ``level`` is quieter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PrivacyFilter(redactor, log_requests))
    numeric = _LEVELS[level.lower()]
    for name in ("dist_infer", "uvicorn"):
        target = logging.getLogger(name)
        for old in list(target.handlers):
            target.removeHandler(old)
        target.addHandler(handler)
        target.setLevel(numeric)
        target.propagate = False
    logger.setLevel(min(numeric, logging.INFO) if log_requests else logging.NOTSET)
    access = logging.getLogger("uvicorn.access")  # raw paths and query strings: our request line replaces it
    access.handlers, access.propagate, access.disabled = [], False, True
