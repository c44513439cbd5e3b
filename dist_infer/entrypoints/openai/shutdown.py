"""How ``dist-infer serve`` stops: a graceful drain on SIGTERM / SIGINT, and a non-zero exit when the engine dies.

On the first SIGTERM or SIGINT the server stops admitting: every new request (a new connection, or a new request
on a kept-alive one) gets 503 in OpenAI's shape, code ``shutting_down``, with ``Retry-After`` and ``Connection:
close``, while ``/health`` and ``/metrics`` keep answering. The listening socket stays open meanwhile, so clients
get that 503 rather than a refused connection. Requests in flight, streamed or not, run on to their normal end;
responses that start during the drain close their connection. Once none is left, or ``--shutdown-timeout``
seconds have passed, what is still open is cut: a stream gets a last ``data: {"error": ...}`` event and
``data: [DONE]``, a request not yet answered gets 503, and their engine requests are aborted. Then uvicorn stops,
the engine shuts down and the process exits 0. A second signal during the drain cuts it short at once (still an
orderly exit); signals after that are ignored while the engine shuts down (so its workers are not orphaned).
One log line marks the start of the drain and one its end, with how many requests finished, were cut and were
refused.

If the engine can no longer serve (its step loop ended with an error: ``engine.is_running`` turned False), a
watcher notices within ``WATCH_INTERVAL_S``, logs why, and the server drains the same way (new requests get 503
``engine_dead``; the ones in flight have already been failed by the engine) and exits 1, so that systemd,
Kubernetes or Ray restarts it.

The state is ``app.state.shutdown`` (a ``GracefulShutdown``): ``draining`` (no new requests are admitted),
``dead_reason`` (None while the engine serves) and ``health()``, the ``/health`` answer: 200 ``{"status": "ok"}``
or ``{"status": "draining"}``, 503 ``{"status": "dead"}`` from the moment the engine is known dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
import time

import uvicorn

from dist_infer.entrypoints.openai.errors import error_response
from dist_infer.entrypoints.openai.request_log import format_exception

logger = logging.getLogger("dist_infer.server")

EXEMPT_PATHS = frozenset({"/health", "/metrics"})  # answered during the drain, and not waited for
WATCH_INTERVAL_S = 0.5  # how often the watcher asks the engine whether it still runs (a cheap, local check)
CUT_GRACE_S = 5.0  # how long cut requests get to abort their engine requests and write their last bytes
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulShutdown:
    """The server's stop sequence; ``run_server`` installs it (``install`` on the app, ``signals_handled`` around
    the serving, ``DrainingServer`` as the uvicorn server) and exits with ``exit_code``."""

    def __init__(self, timeout_s: float, engine=None, redactor=None):
        """``engine``: watched for death (``engine_failure``); ``redactor``: masks error messages in the log
        (``--log-requests``), which are hidden otherwise."""
        if not timeout_s > 0:
            raise ValueError(f"the shutdown timeout must be > 0, got {timeout_s}")
        self.timeout_s, self.engine, self.redactor = timeout_s, engine, redactor
        self.draining = False  # set at the first signal, or when the engine dies: no new request is admitted
        self.dead_reason: str | None = None  # why the engine can no longer serve
        self.exit_code = 0
        self.refused = 0  # requests answered 503 during the drain
        self._requests: set[_InFlight] = set()
        self._idle = asyncio.Event()  # no request in flight
        self._idle.set()
        self._hurry = asyncio.Event()  # a second signal: cut the drain short
        self._deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None  # the uvicorn server, once it serves
        self._pending_signal: str | None = None  # a signal that came before the server's loop ran
        self._stopped = False  # uvicorn has returned: the engine is being shut down
        self._tasks: set[asyncio.Task] = set()

    # ---- what /health and the gate read ------------------------------------------------------------------
    def health(self) -> tuple[int, dict]:
        """The ``/health`` answer (status code, body): 503 once the engine is dead, else 200, saying whether
        the server drains."""
        if self.dead_reason is not None:
            return 503, {"status": "dead"}
        return 200, {"status": "draining" if self.draining else "ok"}

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    # ---- installation --------------------------------------------------------------------------------------
    def install(self, app) -> None:
        """Puts the gate on ``app`` (a FastAPI app not yet serving), innermost of its middleware: behind the
        server's own checks, so refused requests are counted and logged like any other answer."""
        from starlette.middleware import Middleware

        if getattr(app, "middleware_stack", None) is not None:
            raise RuntimeError("install the shutdown gate before the app serves")
        app.user_middleware.append(Middleware(DrainGate, shutdown=self))
        app.state.shutdown = self

    @contextlib.contextmanager
    def signals_handled(self):
        """SIGINT and SIGTERM start (then cut short) the drain instead of killing the process, for as long as
        this lasts (the main thread only, where Python runs signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            yield
        finally:
            self._stopped = True
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def attach(self, server) -> None:
        """The uvicorn server is starting on the running loop (``DrainingServer`` calls this)."""
        self._loop, self._server = asyncio.get_running_loop(), server
        if self._pending_signal is not None:
            self.request_stop(self._pending_signal)

    def serving(self) -> None:
        """The server listens: the engine watcher starts."""
        if self.engine is not None:
            self._spawn(self._watch())

    def detach(self) -> None:
        """uvicorn has returned: what is left (the engine's shutdown) is not the loop's any more."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()

    # ---- stopping --------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:  # a Python signal handler: runs on the main (the loop's) thread
        name = signal.Signals(signum).name
        if self._stopped:
            logger.warning("%s ignored: the server has stopped and the engine is shutting down", name)
        elif self._loop is None:
            self._pending_signal = self._pending_signal or name
        else:
            try:
                self._loop.call_soon_threadsafe(self.request_stop, name)
            except RuntimeError:  # the loop has closed
                logger.warning("%s ignored: the server has stopped and the engine is shutting down", name)

    def request_stop(self, cause: str) -> None:
        """Starts the drain; a second call while it runs cuts it short. On the loop."""
        if not self.draining:
            self.draining = True
            self._spawn(self._drain(cause))
        elif not self._hurry.is_set():
            logger.warning("%s during the drain: cutting the %d request(s) still in flight now", cause,
                           self.in_flight)
            self._hurry.set()

    def engine_died(self, reason: str, error: BaseException | None = None) -> None:
        """The engine can no longer serve: /health turns 503, the server drains and exits 1. On the loop. The
        error's traceback is logged with its messages hidden, as everywhere in the server's log, unless the
        redactor (``--log-requests``) masks them."""
        if self.dead_reason is not None:
            return
        self.dead_reason, self.exit_code = reason, 1
        detail = f"\n{format_exception(error, self.redactor)}" if error is not None else ""
        logger.error("the engine can no longer serve (%s); stopping the server with exit code 1 so that it can "
                     "be restarted%s", reason, detail)
        if not self.draining:
            self.request_stop("engine failure")

    async def _watch(self) -> None:
        while self.dead_reason is None:
            await asyncio.sleep(WATCH_INTERVAL_S)
            failure = engine_failure(self.engine)
            if failure is not None:
                self.engine_died(*failure)

    async def _drain(self, cause: str) -> None:
        started = time.monotonic()
        self._deadline = started + self.timeout_s
        at_start = self.in_flight
        logger.warning("%s: draining; new requests get 503, %d in flight may run for up to %g s", cause, at_start,
                       self.timeout_s)
        waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._hurry.wait())]
        try:
            await asyncio.wait(waits, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        cut = [r for r in self._requests if r.cut()]
        if cut:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CUT_GRACE_S)
        logger.warning("drain ended after %.1f s: %d request(s) finished, %d cut, %d refused",
                       time.monotonic() - started, at_start - len(cut), len(cut), self.refused)
        if self._server is not None:
            self._server.should_exit = True

    def retry_after(self) -> str:
        """Seconds a refused client should wait: what is left of the drain, at least 1."""
        left = (self._deadline - time.monotonic()) if self._deadline is not None else 0.0
        return str(max(1, math.ceil(left)))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _add(self, request: _InFlight) -> None:
        self._requests.add(request)
        self._idle.clear()

    def _remove(self, request: _InFlight) -> None:
        self._requests.discard(request)
        if not self._requests:
            self._idle.set()


def engine_failure(engine) -> tuple[str, BaseException | None] | None:
    """Why ``engine`` can no longer serve, and the error that stopped it if known; None while it can serve
    (``is_running``; an engine without that attribute counts as running)."""
    if getattr(engine, "is_running", True):
        return None
    error = getattr(engine, "_error", None)
    if error is None:
        return "the engine has stopped", None
    if isinstance(error, BaseException):
        return f"its step loop failed with {type(error).__name__}", error
    return str(error), None  # a reason given as text (``RemoteEngine``)


class DrainGate:
    """ASGI middleware: refuses requests while the server drains or its engine is dead, counts the ones in
    flight, and cuts them when the drain's time is up (``GracefulShutdown``)."""

    def __init__(self, app, shutdown: GracefulShutdown):
        self.app, self.shutdown = app, shutdown

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        shutdown = self.shutdown
        if shutdown.draining or shutdown.dead_reason is not None:
            await self._refuse(scope, receive, send)
            return
        request = _InFlight(scope, shutdown)
        shutdown._add(request)
        try:
            await request.run(self.app, receive, send)
        finally:
            shutdown._remove(request)

    async def _refuse(self, scope, receive, send) -> None:
        shutdown = self.shutdown
        shutdown.refused += 1
        if shutdown.dead_reason is not None:
            message, code = "the engine is not running; the server is stopping to be restarted", "engine_dead"
        else:
            message, code = "the server is shutting down and takes no new requests; retry later", "shutting_down"
        _note(scope, code)
        await error_response(503, message, code=code, headers={"Retry-After": shutdown.retry_after(),
                                                                "Connection": "close"})(scope, receive, send)


class _InFlight:
    """One admitted request: its app runs in a task of its own, so the drain can cut it and still answer."""

    def __init__(self, scope, shutdown: GracefulShutdown):
        self.scope, self.shutdown = scope, shutdown
        self.task: asyncio.Task | None = None
        self.started = self.complete = self.event_stream = self.was_cut = False

    def cut(self) -> bool:
        """Cancels the request unless its answer is complete already; True if it did."""
        if self.complete or self.task is None or self.task.done():
            return False
        self.was_cut = True
        self.task.cancel()
        return True

    async def run(self, app, receive, send) -> None:
        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                self.event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                        for k, v in headers)
                if self.shutdown.draining and not any(k.lower() == b"connection" for k, _ in headers):
                    headers.append((b"connection", b"close"))  # the client reconnects, elsewhere if it can
                    message = {**message, "headers": headers}
                self.started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.complete = True
            await send(message)

        self.task = asyncio.ensure_future(app(self.scope, receive, send_wrapper))
        try:
            await asyncio.wait({self.task})
        except asyncio.CancelledError:  # this request's own task was cancelled (uvicorn gave up on it)
            self.task.cancel()
            raise
        if not (self.was_cut and self.task.cancelled()):
            self.task.result()  # its exception, if any, goes to the server's handlers
            return
        await self._answer_cut(receive, send)

    async def _answer_cut(self, receive, send) -> None:
        """The end of a cut request: a 503, or a stream's last error event and ``[DONE]``."""
        _note(self.scope, "shutting_down")
        message = (f"the server shut down before this request finished (it waited "
                   f"{self.shutdown.timeout_s:g} s for requests in flight)")
        try:
            if not self.started:
                await error_response(503, message, code="shutting_down",
                                     headers={"Connection": "close"})(self.scope, receive, send)
            elif self.event_stream and not self.complete:
                error = {"error": {"message": message, "type": "service_unavailable", "param": None,
                                   "code": "shutting_down"}}
                body = f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": body, "more_body": False})
            # a plain answer cut half-written cannot be completed: uvicorn closes its connection
        except Exception:  # the client has gone: nothing to tell it
            pass


def _note(scope, code: str) -> None:
    record = scope.get("state", {}).get("record")
    if record is not None:
        record.note_error(code)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose signals are ``shutdown``'s (uvicorn's own handling waits a fixed time, then cuts
    streams without a word and re-raises the signal: exit 143), and which tells ``shutdown`` when it starts and
    stops. ``shutdown.signals_handled()`` must be active around its ``run()``."""

    def __init__(self, config, shutdown: GracefulShutdown):
        super().__init__(config)
        self.graceful = shutdown

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets=None) -> None:
        self.graceful.attach(self)
        await super().startup(sockets=sockets)
        self.graceful.serving()

    async def serve(self, sockets=None) -> None:
        try:
            await super().serve(sockets=sockets)
        finally:
            self.graceful.detach()
