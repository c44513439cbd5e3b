"""``dist-infer batch``: an OpenAI batch file in, one result line per request out, resumable.

Input lines: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``.
Output lines: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``, written as
each request completes (so the output's order is completion order). On restart, requests whose
``custom_id`` already has a complete line in the output are skipped, and a half-written last line left by an
interruption is dropped, so an interrupted job resumes without losing or repeating work.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid

from pydantic import ValidationError
from tqdm.auto import tqdm

from dist_infer.engine.async_llm_engine import AsyncLLMEngine
from dist_infer.entrypoints.openai.errors import OpenAIError, validation_error
from dist_infer.entrypoints.openai.metrics import ServerMetrics
from dist_infer.jsonl import read_jsonl
from dist_infer.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from dist_infer.entrypoints.openai.serving import OpenAIServing

_ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


def read_requests(path: str) -> list[dict]:
    """The input's request lines; a ValueError naming the line for anything malformed or duplicated."""
    requests, seen = [], set()
    for number, item in read_jsonl(path):
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str) or not item["custom_id"]:
            raise ValueError(f"{path}:{number}: each line needs a non-empty string custom_id")
        if item["custom_id"] in seen:
            raise ValueError(f"{path}:{number}: custom_id {item['custom_id']!r} appears twice")
        if item.get("url") not in _ENDPOINTS:
            raise ValueError(f"{path}:{number}: url must be one of {', '.join(_ENDPOINTS)}, got {item.get('url')!r}")
        if item.get("method", "POST") != "POST" or not isinstance(item.get("body"), dict):
            raise ValueError(f"{path}:{number}: needs method POST and a JSON object body")
        seen.add(item["custom_id"])
        requests.append(item)
    return requests


def finished_ids(path: str) -> set[str]:
    """custom_ids with a complete line in an existing output; truncates the file after the last complete line.

    A line is complete when it ends with its newline (each result is written as one ``line + "\n"``) and holds a
    JSON object with a custom_id. A last line without its newline is torn even when it parses: the interruption
    fell between the record and its newline, and appending to it would glue the next record onto it."""
    if not os.path.exists(path):
        return set()
    done, keep = set(), 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # cut short by an interruption: redone
            try:
                done.add(json.loads(raw)["custom_id"])
            except (ValueError, KeyError, TypeError):
                break  # a line cut short by an interruption: everything from here is rewritten
            keep += len(raw)
    with open(path, "rb+") as f:
        f.truncate(keep)
    return done


async def _answer(serving: OpenAIServing, item: dict) -> dict:
    body = dict(item["body"], stream=False)
    request_id = f"batch_req_{uuid.uuid4().hex}"
    try:
        parsed = _ENDPOINTS[item["url"]].model_validate(body)
        handler = serving.chat if item["url"] == "/v1/chat/completions" else serving.completions
        response = {"status_code": 200, "request_id": request_id, "body": await handler(parsed)}
        error = None
    except (OpenAIError, ValidationError, ValueError) as e:
        failure = e if isinstance(e, OpenAIError) else (
            validation_error(e) if isinstance(e, ValidationError) else OpenAIError(400, str(e)))
        response = {"status_code": failure.status, "request_id": request_id, "body": None}
        error = {"code": failure.code or "invalid_request", "message": failure.message}
    return {"id": request_id, "custom_id": item["custom_id"], "response": response, "error": error}


async def run_batch(engine: AsyncLLMEngine, model_name: str, input_path: str, output_path: str,
                    max_concurrency: int = 256, show_progress: bool = True) -> int:
    """Answers every request of the input not yet in the output; returns how many were answered now."""
    requests = read_requests(input_path)
    done = finished_ids(output_path)
    todo = [r for r in requests if r["custom_id"] not in done]
    serving = OpenAIServing(engine, model_name, None, ServerMetrics(engine, model_name))
    gate = asyncio.Semaphore(max_concurrency)
    with open(output_path, "a") as out, tqdm(total=len(requests), initial=len(requests) - len(todo),
                                             desc="Batch requests", disable=not show_progress) as bar:
        async def one(item: dict) -> None:
            async with gate:
                line = await _answer(serving, item)
            out.write(json.dumps(line) + "\n")
            out.flush()  # a result on disk is a result a restart will not redo
            bar.update(1)

        await asyncio.gather(*(one(item) for item in todo))
    return len(todo)
