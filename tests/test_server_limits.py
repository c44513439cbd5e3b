"""The server's limits against hostile or careless clients, on a real ``dist-infer serve`` (tiny model):
admission by sequences (``--max-waiting``, ``--max-prompts-per-request``), oversized chunked uploads, uploads
abandoned half way, idle and half-sent connections (uvicorn's settings as ``run_server`` uses them), and the
log volume of one error raised into many streams."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import ServerProcess

MAX_WAITING = 4
MAX_PROMPTS = 8
MAX_BYTES = 64 * 1024
REQUEST_TIMEOUT = 3.0
KEEP_ALIVE = 1.0
CMPL = "/v1/completions"


@pytest.fixture(scope="module")
def server(tiny_llama_with_tokenizer):
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--kv-cache-memory", str(1 << 22),
                           "--max-num-seqs", "2", "--max-waiting", str(MAX_WAITING),
                           "--max-prompts-per-request", str(MAX_PROMPTS), "--max-request-bytes", str(MAX_BYTES),
                           "--request-timeout", str(REQUEST_TIMEOUT), "--timeout-keep-alive", str(KEEP_ALIVE),
                           "--log-level", "info")
    server.model = os.path.basename(tiny_llama_with_tokenizer)
    yield server
    server.stop()


def _samples(server) -> dict:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ---- admission ----------------------------------------------------------------------------------------------------

def test_a_burst_of_streams_is_held_to_max_waiting(server):
    """60 streams at once: the check and the reservation are atomic, so some get 429 and the engine's waiting
    queue never holds more than --max-waiting (before, every stream passed the check before any was counted)."""

    async def one(client, i):
        body = {"model": server.model, "prompt": f"Burst {i}", "max_tokens": 24, "stream": True, "ignore_eos": True}
        async with client.stream("POST", server.base_url + CMPL, json=body) as response:
            if response.status_code == 429:
                assert response.headers.get("retry-after")
                assert json.loads(await response.aread())["error"]["code"] == "queue_full"
                return 429
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            return 200

    async def main():
        peak, done = 0, asyncio.Event()

        async def watch(client):
            nonlocal peak
            while not done.is_set():
                text = (await client.get(server.base_url + "/metrics")).text
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name == "dist_infer_num_requests_waiting":
                            peak = max(peak, s.value)
                await asyncio.sleep(0.01)

        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            watcher = asyncio.create_task(watch(client))
            try:
                outcomes = await asyncio.gather(*(one(client, i) for i in range(60)))
            finally:
                done.set()
                await watcher
        return outcomes, peak

    outcomes, peak = asyncio.run(main())
    assert outcomes.count(429) > 0 and outcomes.count(200) >= MAX_WAITING, outcomes
    assert peak <= MAX_WAITING, f"{peak} requests waited with --max-waiting {MAX_WAITING}"


def _long_streams(server, count: int):
    """``count`` long streaming requests, opened and left unread (they keep the engine's two slots busy)."""
    client = httpx.Client(timeout=120)
    body = {"model": server.model, "prompt": "Hold the line", "max_tokens": 480, "ignore_eos": True, "stream": True}
    streams = []
    for _ in range(count):
        cm = client.stream("POST", server.base_url + CMPL, json=body)
        response = cm.__enter__()
        assert response.status_code == 200
        streams.append(cm)

    def close():
        for cm in streams:
            cm.__exit__(None, None, None)
        client.close()

    return close


def test_prompts_times_n_is_what_counts(server):
    url = server.base_url + CMPL
    many = httpx.post(url, json={"model": server.model, "prompt": [f"p{i}" for i in range(MAX_PROMPTS + 1)],
                                 "max_tokens": 2}, timeout=60)
    assert many.status_code == 400, many.text
    error = many.json()["error"]
    assert error["code"] == "too_many_prompts" and str(MAX_PROMPTS) in error["message"] and error["param"] == "prompt"

    big = {"model": server.model, "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}  # 6 sequences > 4
    # Into an empty queue a request larger than the limit is admitted (else it could never run) ...
    alone = httpx.post(url, json=big, timeout=60)
    assert alone.status_code == 200 and len(alone.json()["choices"]) == 6
    # ... but not while anything waits: 2 running + 1 waiting, and 1 + 6 > 4.
    close = _long_streams(server, 3)
    try:
        _wait_for(lambda: _value(_samples(server), "dist_infer_num_requests_waiting") >= 1, 30,
                  "the third long stream never waited")
        crowded = httpx.post(url, json=big, timeout=60)
        assert crowded.status_code == 429, crowded.text
        assert "6 sequences" in crowded.json()["error"]["message"]
        small = httpx.post(url, json={**big, "prompt": "x", "n": 3}, timeout=60)  # 1 + 3 <= 4: admitted
        assert small.status_code == 200, small.text
    finally:
        close()


def test_max_waiting_zero_is_refused_at_start():
    result = subprocess.run([sys.executable, "-m", "dist_infer.entrypoints.cli", "serve", "--max-waiting", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "max_waiting must be >= 1, got 0; omit it for no limit" in result.stderr


# ---- bodies -------------------------------------------------------------------------------------------------------

def test_a_chunked_upload_over_the_limit_is_cut_off(server):
    """No Content-Length: the server counts as it reads, answers 413 at the limit and closes the connection,
    so the client's generator is never drained (it would be, were the whole body read first)."""
    chunk, total = b"x" * 16384, 64 << 20
    sent = 0

    def body():
        nonlocal sent
        while sent < total:
            sent += len(chunk)
            yield chunk

    response = httpx.post(server.base_url + CMPL, content=body(), timeout=60,
                          headers={"content-type": "application/json", "x-request-id": "chunked-big"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert sent < total // 4, f"the client sent {sent} of {total} bytes: the server read on past the limit"


def _raw(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    return sock


def _read_until_closed(sock) -> bytes:
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece


def test_a_client_leaving_mid_upload_is_a_499_not_an_error(server):
    before = _value(_samples(server), "dist_infer_requests_total", endpoint=CMPL, status="499")
    sock = _raw(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 5000\r\nx-request-id: upload-gone\r\n\r\n" + b'{"model": "' + b"x" * 100)
    time.sleep(0.2)  # let the headers reach the app, so the request has begun; the check below waits properly
    sock.close()
    _wait_for(lambda: _value(_samples(server), "dist_infer_requests_total", endpoint=CMPL, status="499") > before,
              10, "the abandoned upload was not counted as 499")
    lines = [line for line in server.output().splitlines() if "upload-gone" in line]
    assert len(lines) == 1 and "status=499" in lines[0] and "error=client_disconnected" in lines[0], lines
    assert "Traceback" not in server.output()
    assert _value(_samples(server), "dist_infer_requests_total", endpoint=CMPL, status="500") == 0


def test_a_body_that_never_finishes_gets_408(server):
    sock = _raw(server)
    started = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    assert time.monotonic() - started < REQUEST_TIMEOUT + 3


# ---- connections --------------------------------------------------------------------------------------------------

def test_idle_and_half_sent_connections_are_closed(server):
    # An idle keep-alive connection, after one answer: closed after --timeout-keep-alive.
    sock, started = _raw(server), time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert _read_until_closed(sock).startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < REQUEST_TIMEOUT - 0.5  # the keep-alive timeout, not the header one
    # A connection that never says anything: closed after --request-timeout.
    sock, started = _raw(server), time.monotonic()
    assert _read_until_closed(sock) == b""
    assert time.monotonic() - started < REQUEST_TIMEOUT + 2
    # Half a request line and headers: 408, then closed.
    sock, started = _raw(server), time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Ty")
    answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer, answer[:200]
    assert time.monotonic() - started < REQUEST_TIMEOUT + 2


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(server):
    """No max_tokens: the answer may run to the model's context (512 for the tiny model), and ends "length"
    exactly there (ignore_eos, so the random model's end-of-text token cannot end it sooner)."""
    reply = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": server.model, "messages": [{"role": "user", "content": "Go on forever."}], "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 512


def test_the_server_still_answers(server):
    reply = httpx.post(server.base_url + CMPL, json={"model": server.model, "prompt": "ok", "max_tokens": 2},
                       timeout=60)
    assert reply.status_code == 200


# ---- logs ---------------------------------------------------------------------------------------------------------

def test_one_error_in_many_streams_logs_its_traceback_once(caplog):
    """A worker death ends every stream with the same exception object; each raise lengthens its traceback, so
    logging it in full per stream grew the log quadratically. Now: one traceback, then one line per stream."""
    from dist_infer.entrypoints.openai.api_server import _guarded
    from dist_infer.entrypoints.openai.redact import Redactor
    from dist_infer.entrypoints.openai.request_log import RequestLog

    def lines_for(num_streams: int) -> int:
        shared = RuntimeError("worker rank 1 died")
        log = RequestLog(False, Redactor())

        async def failing():
            raise shared
            yield  # an async generator

        async def main():
            for i in range(num_streams):
                assert [p async for p in _guarded(failing(), f"s{i}", log)][-1] == "data: [DONE]\n\n"

        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dist_infer.server"):
            asyncio.run(main())
        return sum(len(r.getMessage().splitlines()) for r in caplog.records)

    one, ten, forty = lines_for(1), lines_for(10), lines_for(40)
    assert ten - one == 9 and forty - one == 39, (one, ten, forty)


def test_remote_engine_never_blocks_the_event_loop_for_its_queue_length(tiny_llama_with_tokenizer):
    """``serve --name``: the engine is a Ray actor. Admission reads its waiting count on every request, on the
    event loop; that read must return at once (the last value fetched) and refresh in the background, not
    wait a round trip (the actor here answers after 0.5 s, as a busy one might)."""
    from dist_infer.engine.arg_utils import EngineArgs
    from dist_infer.entrypoints.ray_service import RemoteEngine

    class SlowActorMethod:
        def __init__(self):
            self.calls = 0

        def remote(self):
            self.calls += 1
            loop = asyncio.get_running_loop()
            answer = loop.create_future()
            loop.call_later(0.5, answer.set_result, 7)
            return answer

    class Handle:
        class actor:
            num_waiting = SlowActorMethod()

    config = EngineArgs.from_kwargs(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22).create_engine_config()
    engine = RemoteEngine(Handle(), config)

    async def main():
        started = time.monotonic()
        first = [engine.num_waiting() for _ in range(100)]
        assert time.monotonic() - started < 0.1 and first == [0] * 100
        await asyncio.sleep(0.1)
        assert [engine.num_waiting() for _ in range(100)] == [0] * 100
        assert Handle.actor.num_waiting.calls == 1  # one fetch in flight at a time
        deadline = time.monotonic() + 5
        while engine.num_waiting() != 7:
            assert time.monotonic() < deadline, "the background fetch never landed"
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert engine.num_waiting() == 7  # outside an event loop: the last value, no call
