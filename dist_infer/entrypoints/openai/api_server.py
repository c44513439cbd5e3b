"""``dist-infer serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn, one asyncio engine behind it).

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, vLLM's ``/tokenize``, ``/detokenize``
and ``/version`` (see ``serving_info``), ``/health`` (the process is up),
``/ready`` (the workers of every serving replica answer and a one-token request crosses each of its stages:
``ready``, or ``degraded`` while another replica is failed, starting or rebuilding; 503 naming what failed
when no replica serves), ``/admin/replicas`` (GET each replica's state and history; POST ``{"replicas": N}``
to run N), ``/metrics`` (Prometheus) and ``/openapi.json``. With API keys every route but
``/health`` needs ``Authorization: Bearer <key>`` (``--metrics-public`` opens ``/metrics`` too); see
``middleware`` for the checks every request goes through, ``auth`` for keys, ``request_log`` for what is logged.
Bodies over ``max_request_bytes`` get 413, non-JSON POSTs 415, malformed ones 400 (deep nesting and invalid
Unicode included), unknown models and paths 404, slow headers or bodies 408, a full waiting queue 429 with
``Retry-After``, a client gone before its answer 499 (in metrics and the log); only real faults are 500, logged
with the request id. A non-streamed request whose client disconnects is cancelled, aborting its engine requests.
Fields a body has that the server does not know are ignored and named in the ``x-ignored-fields`` response
header (see ``protocol``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dist_infer.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from dist_infer.outputs import RequestFailedError
from dist_infer.entrypoints.openai.auth import APIKeys
from dist_infer.entrypoints.openai.body import decode_json_object
from dist_infer.entrypoints.openai.errors import OpenAIError, http_error, http_error_code, validation_error
from dist_infer.entrypoints.openai.http_server import uvicorn_config
from dist_infer.entrypoints.openai.metrics import ServerMetrics
from dist_infer.entrypoints.openai.middleware import ServerMiddleware
from dist_infer.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                    TokenizeChatRequest, TokenizeCompletionRequest, ignored_fields)
from dist_infer.entrypoints.openai.redact import Redactor
from dist_infer.entrypoints.openai.request_log import RequestLog, configure_logging
from dist_infer.entrypoints.openai.serving import EventStream, OpenAIServing
from dist_infer.entrypoints.openai.serving_info import ModelInfo
from dist_infer.entrypoints.openai.shutdown import DrainingServer, GracefulShutdown
from dist_infer.entrypoints.openai.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("dist_infer.server")

_PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_RETRY_AFTER_S = 5  # seconds a client should wait before retrying a request that outlived its replicas
IGNORED_FIELDS_HEADER = "x-ignored-fields"


@dataclass
class ServerSettings:
    model_name: str
    api_keys: APIKeys | str | None = field(default_factory=APIKeys)  # a str: one key, named "default"
    max_waiting: int | None = None  # sequences (prompts x n) that may wait to start; None: no limit
    max_request_bytes: int = 1 << 20
    ready_timeout_s: float = 30.0
    metrics_public: bool = False  # /metrics answers without a key
    log_requests: bool = False  # log prompt and completion text (masked)
    max_prompts_per_request: int = 256
    request_timeout_s: float = 30.0  # for a request's headers, and again for its body
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1024  # open connections (uvicorn's limit_concurrency); more get 503
    shutdown_timeout_s: float = 30.0  # on SIGTERM / SIGINT, requests in flight get this long to finish
    tool_call_parser: str | None = None  # how tool calls are read from the model's text (tool_parsers' names)
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (and tools without tool_choice) are served

    def __post_init__(self) -> None:
        if self.api_keys is None or isinstance(self.api_keys, str):
            self.api_keys = APIKeys.load(self.api_keys, "api_key")
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}; omit it for no limit")
        for name in ("max_request_bytes", "max_prompts_per_request", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "keep_alive_timeout_s", "ready_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got "
                             f"{self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser (--tool-call-parser) to read the "
                             "model's calls")


def build_app(engine: AsyncLLMEngine, settings: ServerSettings, num_replicas: int | None = None) -> FastAPI:
    app = FastAPI(title="dist-infer", docs_url=None, redoc_url=None)
    app.router.redirect_slashes = False  # "/v1/models/" is a 404, not a redirect
    if num_replicas is None:
        num_replicas = len(getattr(getattr(engine, "engine", None), "cores", ())) or 1
    metrics = ServerMetrics(engine, settings.model_name, num_replicas, min(settings.ready_timeout_s, 10.0))
    serving = OpenAIServing(engine, settings.model_name, settings.max_waiting, metrics,
                            settings.max_prompts_per_request, settings.tool_call_parser,
                            settings.enable_auto_tool_choice)
    info = ModelInfo(engine, settings.model_name)
    request_log = RequestLog(settings.log_requests, Redactor(settings.api_keys.secrets()))
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    open_paths = {"/health"} | ({"/metrics"} if settings.metrics_public else set())
    app.add_middleware(ServerMiddleware, routes=app.router.routes, keys=settings.api_keys, open_paths=open_paths,
                       max_request_bytes=settings.max_request_bytes, metrics=metrics, request_log=request_log,
                       body_timeout_s=settings.request_timeout_s)

    def note(request: Request, code: str | None, param: str | None = None) -> None:
        record = getattr(request.state, "record", None)
        if record is not None:
            record.note_error(code, param)

    def answer(request: Request, error: OpenAIError):
        note(request, error.code, error.param)
        return error.response()

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def fastapi_validation(request: Request, exc: RequestValidationError):
        return answer(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException):
        note(request, http_error_code(exc.status_code))
        return http_error(request, exc)

    async def parse(request: Request, model, data: dict | None = None):
        """The body as ``model``; the fields it ignored are kept for ``respond``'s header."""
        if data is None:
            data = decode_json_object(await request.body())  # the middleware stops reading past the limit (413)
        try:
            parsed = model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        request.state.ignored_fields = ignored_fields(parsed)
        return parsed

    async def respond(request: Request, result):
        if isinstance(result, dict):
            response = JSONResponse(result)
        else:
            response = _EventStreamResponse(result, _guarded(result, request.state.request_id, request_log))
        ignored = getattr(request.state, "ignored_fields", None)
        if ignored:
            response.headers[IGNORED_FIELDS_HEADER] = ", ".join(ignored)
        return response

    @app.get("/health")
    async def health():
        """200 while the server can serve or recover (a replica failing and rebuilding included), or drains;
        503 once the engine is gone for good (every replica given up), until the process exits."""
        shutdown = getattr(app.state, "shutdown", None)  # set by run_server; absent when build_app is used alone
        if shutdown is None:
            return {"status": "ok"}
        status, body = shutdown.health()
        return JSONResponse(body, status_code=status)

    @app.get("/ready")
    async def ready():
        try:
            status = await engine.check_ready(settings.ready_timeout_s)
        except Exception as e:
            metrics.count_ready(False)
            reason = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            return JSONResponse({"status": "not ready", "error": reason}, status_code=503)
        metrics.count_ready(True)
        return status  # "ready", or "degraded" while some replica is down and another serves

    @app.get("/admin/replicas")
    async def get_replicas():
        return {"replicas": [_replica_report(r) for r in await engine.replica_stats()]}

    @app.post("/admin/replicas")
    async def set_replicas(request: Request):
        body = decode_json_object(await request.body())
        count = body.get("replicas")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise OpenAIError(400, f"'replicas' must be an int >= 1, got {count!r}", param="replicas",
                              code="invalid_value")
        try:
            states = await engine.set_num_replicas(count)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="replicas", code="invalid_value") from None
        except EngineDeadError as e:
            raise OpenAIError(503, f"the engine is not running: {e}", code="engine_dead") from None
        logger.warning("replica count set to %d by an admin call", count)
        return {"replicas": count, "states": {str(d): state for d, state in states.items()}}

    @app.get("/metrics")
    async def prometheus():
        return Response(await metrics.render(), media_type=_PROMETHEUS_TYPE)

    @app.get("/v1/models")
    async def models():
        return info.models()

    @app.get("/version")
    async def version():
        return info.version()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        data = decode_json_object(await request.body())
        body = await parse(request, TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest, data)
        return await respond(request, info.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await respond(request, info.detokenize(await parse(request, DetokenizeRequest)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        return await respond(request, await _unless_disconnected(request, _serve(serving.completions, body,
                                                                                 request.state.record)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatCompletionRequest)
        return await respond(request, await _unless_disconnected(request, _serve(serving.chat, body,
                                                                                 request.state.record)))

    return app


def _replica_report(report: dict) -> dict:
    events = report["events"]
    return {"replica": report["index"], "state": report["state"], "failures": events.failures,
            "migrations": events.migrations, "rebuilds": events.rebuilds, "rebuild_failures": events.rebuild_failures,
            "rebuild_seconds": events.rebuild_seconds, "last_error": events.last_error,
            "running": report["stats"].num_running if report["stats"] is not None else 0,
            "waiting": report["stats"].num_waiting if report["stats"] is not None else 0}


async def _serve(handler, body, record):
    try:
        return await handler(body, record)
    except EngineDeadError as e:
        raise OpenAIError(503, f"the engine is not running: {e}", code="engine_dead") from None
    except RequestFailedError as e:  # accepted, but its replicas failed under it: worth a retry
        raise OpenAIError(503, str(e), code="replica_failure", headers={"Retry-After": str(_RETRY_AFTER_S)}) from None
    except ValueError as e:  # a request the engine refused (e.g. it can never fit)
        raise OpenAIError(400, str(e), code="invalid_request") from None


async def _unless_disconnected(request: Request, work):
    """``work``'s result, or ``ClientDisconnect`` as soon as the client goes away, ``work`` cancelled (which
    aborts its engine requests). A non-streamed answer would otherwise run to its end for nobody."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        watch.cancel()
        gone = not task.done()
        if gone:
            task.cancel()
    if gone:
        with contextlib.suppress(asyncio.CancelledError):
            await task  # its engine requests are aborted on the way out
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: ``receive`` only waits for that now)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStreamResponse(StreamingResponse):
    """An SSE response that closes its ``EventStream`` however it ends (finished, client gone, never started),
    so its engine requests are aborted and its admission released."""

    def __init__(self, stream: EventStream, content):
        super().__init__(content, media_type="text/event-stream")
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


async def _guarded(stream, request_id: str, request_log: RequestLog):
    """A stream whose status line has gone out can only report a later failure inside the stream."""
    try:
        async for item in stream:
            yield item
    except RequestFailedError as e:  # its replicas failed under it (the engine logged why): the client may retry
        logger.warning("stream %s failed: the engine could not finish it after replica failures", request_id)
        body = {"error": {"message": f"{e} (request id {request_id})", "type": "service_unavailable", "param": None,
                          "code": "replica_failure"}}
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:
        request_log.exception(f"stream {request_id} failed", e)
        body = {"error": {"message": f"{e} (request id {request_id})", "type": "server_error", "param": None,
                          "code": "internal_error"}}
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def run_server(engine_args, settings: ServerSettings, host: str, port: int, log_level: str = "warning",
               name: str | None = None) -> int:
    """Builds the engine, serves until SIGTERM / SIGINT (a graceful drain, see ``shutdown``) or until the engine
    dies, then shuts the engine (and its workers) down. Returns the exit code: 0 after a signal, 1 when the
    engine could no longer serve (so that a supervisor restarts the server).

    With ``name``, the engine runs in a detached named Ray actor that other Ray drivers can also reach
    (``dist_infer.get_handle(name)``), and this server talks to it."""
    redactor = Redactor(settings.api_keys.secrets())
    configure_logging(log_level, settings.log_requests, redactor)
    config = engine_args.create_engine_config()
    if name is not None:
        from dataclasses import asdict

        from dist_infer.entrypoints.ray_service import RemoteEngine, start_service

        # The model was resolved (a GGUF file converted) above: the actor gets the folder, not the name again.
        engine = RemoteEngine(start_service(name, **{**asdict(engine_args), "model": config.model_config.model}),
                              config)
    else:
        engine = AsyncLLMEngine(config)
    shutdown = GracefulShutdown(settings.shutdown_timeout_s, engine, redactor if settings.log_requests else None)
    # Signals drain the server (and are then ignored while the engine shuts down, so workers are not orphaned).
    with shutdown.signals_handled():
        try:
            app = build_app(engine, settings, config.parallel_config.data_parallel_size)
            shutdown.install(app)
            keys = settings.api_keys.names
            access = f"API keys: {', '.join(keys)}" if keys else "no API key"
            print(f"dist-infer serving {settings.model_name} on http://{host}:{port} ({access})", flush=True)
            DrainingServer(uvicorn_config(app, host, port, log_level, settings), shutdown).run()
        finally:
            engine.shutdown()
    return shutdown.exit_code
