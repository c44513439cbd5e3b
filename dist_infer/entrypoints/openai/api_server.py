"""``dist-infer serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn, one asyncio engine behind it).

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/health`` (the process is up),
``/ready`` (every worker answers and a one-token request crosses every stage of every replica; 503 naming
what failed otherwise) and ``/metrics`` (Prometheus). With an API key, ``/v1/*`` needs
``Authorization: Bearer <key>``. Bodies over ``max_request_bytes`` get 413, malformed ones 400, unknown
models 404, a full waiting queue 429 with ``Retry-After``; only real faults are 500, logged with the request id.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from dist_infer.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from dist_infer.entrypoints.openai.errors import OpenAIError, error_response, validation_error
from dist_infer.entrypoints.openai.metrics import ServerMetrics
from dist_infer.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from dist_infer.entrypoints.openai.serving import OpenAIServing

logger = logging.getLogger("dist_infer.server")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_waiting: int | None = None
    max_request_bytes: int = 1 << 20
    ready_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="dist-infer", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine, settings.model_name)
    serving = OpenAIServing(engine, settings.model_name, settings.max_waiting, metrics)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings

    @app.middleware("http")
    async def guard(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        path = request.url.path
        if path.startswith("/v1/") and settings.api_key is not None:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else None
            if given is None or not secrets.compare_digest(given.encode(), settings.api_key.encode()):
                message = "Missing API key" if given is None else "Incorrect API key provided"
                return _finish(metrics, path, error_response(401, message, code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            return _finish(metrics, path, error_response(
                413, f"request body of {length} bytes exceeds the limit of {settings.max_request_bytes}",
                code="request_too_large"))
        try:
            response = await call_next(request)
        except Exception:  # a real fault: logged with the id, answered in OpenAI's shape
            logger.exception("request %s to %s failed", request_id, path)
            response = error_response(500, f"internal error (request id {request_id})", code="internal_error")
        response.headers["x-request-id"] = request_id
        return _finish(metrics, path, response)

    @app.exception_handler(OpenAIError)
    async def openai_error(_, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def fastapi_validation(_, exc: RequestValidationError):
        return validation_error(exc).response()

    async def parse(request: Request, model):
        body = await request.body()
        if len(body) > settings.max_request_bytes:
            raise OpenAIError(413, f"request body exceeds the limit of {settings.max_request_bytes} bytes",
                              code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    async def respond(request: Request, result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(_guarded(result, request.state.request_id), media_type="text/event-stream",
                                 headers={"x-request-id": request.state.request_id})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        try:
            await engine.check_ready(settings.ready_timeout_s)
        except Exception as e:
            reason = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            return JSONResponse({"status": "not ready", "error": reason}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus():
        try:
            body = await metrics.render()
        except EngineDeadError as e:
            return error_response(503, f"the engine is not running: {e}", code="engine_dead")
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "dist-infer"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, await _serve(serving.completions, await parse(request, CompletionRequest)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await respond(request, await _serve(serving.chat, await parse(request, ChatCompletionRequest)))

    return app


async def _serve(handler, body):
    try:
        return await handler(body)
    except EngineDeadError as e:
        raise OpenAIError(503, f"the engine is not running: {e}", code="engine_dead") from None
    except ValueError as e:  # a request the engine refused (e.g. it can never fit)
        raise OpenAIError(400, str(e), code="invalid_request") from None


async def _guarded(stream, request_id: str):
    """A stream whose status line has gone out can only report a later failure inside the stream."""
    try:
        async for item in stream:
            yield item
    except Exception as e:
        logger.exception("stream %s failed", request_id)
        body = {"error": {"message": f"{e} (request id {request_id})", "type": "server_error", "param": None,
                          "code": "internal_error"}}
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def _finish(metrics: ServerMetrics, path: str, response):
    if path.startswith("/v1/"):
        metrics.count_response(path, response.status_code)
    return response


def run_server(engine_args, settings: ServerSettings, host: str, port: int, log_level: str = "warning",
               name: str | None = None) -> None:
    """Builds the engine, serves until interrupted, then shuts the engine (and its workers) down.

    With ``name``, the engine runs in a detached named Ray actor that other Ray drivers can also reach
    (``dist_infer.get_handle(name)``), and this server talks to it."""
    import uvicorn

    config = engine_args.create_engine_config()
    if name is not None:
        from dataclasses import asdict

        from dist_infer.entrypoints.ray_service import RemoteEngine, start_service

        engine = RemoteEngine(start_service(name, **asdict(engine_args)), config)
    else:
        engine = AsyncLLMEngine(config)
    try:
        app = build_app(engine, settings)
        print(f"dist-infer serving {settings.model_name} on http://{host}:{port}", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off")
    finally:
        engine.shutdown()
