"""How a real ``dist-infer serve`` stops (tiny model, real HTTP clients): SIGTERM drains it (new requests get 503
with Retry-After, on new and kept-alive connections alike, while the streams in flight run to their end; exit 0),
``--shutdown-timeout`` and a second signal cut the drain short (a stream ends with an error event and
``[DONE]``, an unanswered request gets 503; exit 0), and a dead engine makes the server answer 503 and exit 1.

No test sleeps and hopes: each waits, with a bound, for something it can observe (a stream's first chunk, the
first 503, the process's exit). A request whose body is held back half-sent keeps a drain open for as long as a
test needs it to look around.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from conftest import save_tiny_model
from server_helpers import ServerProcess, worker_processes

CMPL = "/v1/completions"
# A replica whose worker dies is rebuilt (up to --max-replica-restarts times): with no rebuild allowed, the
# engine dies. (Before the engine rebuilt replicas, this was [] : a dead worker always ended the engine.)
_NO_REBUILD_ARGS: list[str] = ["--max-replica-restarts", "0"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer, a long context (streams of thousands of tokens, which take
    seconds even on a fast CPU) and heads that split over tensor parallelism 2."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    return save_tiny_model(config, tmp_path_factory.mktemp("shutdown_tiny"), tokenizer_dir=default_model_path)


def _serve(model: str, *args: str) -> ServerProcess:
    server = ServerProcess("--model", model, "--kv-cache-memory", str(1 << 24), "--timeout-keep-alive", "60", *args)
    server.model = os.path.basename(model)
    return server


def _body(server, max_tokens: int, stream: bool = True) -> dict:
    body = {"model": server.model, "prompt": "Go on", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


class _Stream(threading.Thread):
    """A streamed completion read in a thread: ``first`` is set at its first chunk; ``lines`` holds its data
    lines once it ends."""

    def __init__(self, server, max_tokens: int):
        super().__init__(daemon=True)
        self.server, self.body = server, _body(server, max_tokens)
        self.first, self.lines, self.status, self.error = threading.Event(), [], None, None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.server.base_url + CMPL, json=self.body, timeout=120) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line[6:])
                        self.first.set()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.first.set()

    def result(self, timeout: float) -> tuple[list[dict], str]:
        """The JSON events and the last line, once the stream has ended."""
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        assert self.error is None and self.status == 200, (self.status, self.error)
        return [json.loads(line) for line in self.lines[:-1]], self.lines[-1]


def _start_streams(server, n: int, max_tokens: int) -> list[_Stream]:
    streams = [_Stream(server, max_tokens) for _ in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(120) and s.lines, f"a stream never started: {s.status} {s.error}"
    return streams


class _HalfSentRequest:
    """A non-streamed completion whose last body byte is held back: admitted (in flight) but unanswered until
    ``finish()`` sends that byte."""

    def __init__(self, server, max_tokens: int):
        body = json.dumps(_body(server, max_tokens, stream=False)).encode()
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d"
                          b"\r\n\r\n%s" % (CMPL.encode(), len(body), body[:-1]))
        self._last = body[-1:]

    def finish(self) -> tuple[int, dict, dict]:
        self.sock.sendall(self._last)
        return _read_response(self.sock)


def _request(sock: socket.socket, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """One request on an open (possibly kept-alive) connection, and its answer."""
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    sock.sendall(head.encode() + b"\r\n" + data)
    return _read_response(sock)


def _read_response(sock: socket.socket) -> tuple[int, dict, dict]:
    """(status, lower-cased headers, JSON body) of a response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-answer"
        rest += chunk
    return int(lines[0].split()[1]), headers, json.loads(rest[:length])


def _wait_for_refusal(server, timeout: float = 30) -> httpx.Response:
    """The first answer to a new connection that is a 503 (the server has seen the signal or the death)."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(server.base_url + "/v1/models", timeout=30, headers={"Connection": "close"})
        if response.status_code == 503:
            return response
        assert response.status_code == 200, response.text
        assert time.monotonic() < deadline, "the server kept admitting new requests"
        time.sleep(0.05)


def _assert_refused(status: int, headers: dict, body: dict, code: str) -> None:
    assert status == 503, (status, body)
    assert body["error"]["code"] == code and body["error"]["type"] == "service_unavailable", body
    assert int(headers["retry-after"]) >= 1 and headers.get("connection") == "close", headers


def test_sigterm_drains_streams_in_flight_and_refuses_new_requests(tiny_model):
    server = _serve(tiny_model)
    try:
        kept_alive = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        assert _request(kept_alive, "GET", "/v1/models")[0] == 200  # the connection stays open for another
        held = _HalfSentRequest(server, max_tokens=8)  # in flight before the signal, answered after the checks
        streams = _start_streams(server, 4, max_tokens=200)
        os.kill(server.proc.pid, signal.SIGTERM)

        refused = _wait_for_refusal(server)
        _assert_refused(refused.status_code, dict(refused.headers), refused.json(), "shutting_down")
        assert server.proc.poll() is None, "the server exited while requests were in flight"
        _assert_refused(*_request(kept_alive, "POST", CMPL, _body(server, 4, stream=False)), "shutting_down")
        fresh = httpx.post(server.base_url + CMPL, json=_body(server, 4), timeout=30)
        _assert_refused(fresh.status_code, dict(fresh.headers), fresh.json(), "shutting_down")
        assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
        assert httpx.get(server.base_url + "/metrics", timeout=30).status_code == 200

        status, headers, answer = held.finish()  # admitted before the signal: answered in full
        assert status == 200 and answer["choices"][0]["finish_reason"] == "length", answer
        assert answer["usage"]["completion_tokens"] == 8 and headers.get("connection") == "close"
        for s in streams:
            events, last = s.result(120)
            assert last == "[DONE]", events[-1:]
            assert events[-2]["choices"][0]["finish_reason"] == "length", events[-2]
            assert events[-1]["usage"]["completion_tokens"] == 200, events[-1]
            assert all("error" not in e for e in events)
        assert server.proc.wait(60) == 0, server.output()[-3000:]
        log = server.output()
        assert log.count("SIGTERM: draining") == 1 and log.count("drain ended") == 1, log[-3000:]
        ended = re.search(r"drain ended after [\d.]+ s: (\d+) request\(s\) finished, (\d+) cut, (\d+) refused", log)
        assert ended and int(ended[1]) >= 5 and ended.group(2, 3) == ("0", "3"), log[-3000:]
    finally:
        server.stop()


def _assert_cut(stream: _Stream, max_tokens: int) -> None:
    events, last = stream.result(60)
    assert last == "[DONE]", events[-1:]
    error = events[-1]["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable", error
    tokens = events[:-1]
    assert tokens and all(e["choices"][0]["finish_reason"] is None for e in tokens), tokens[-1:]
    assert len(tokens) < max_tokens


def test_shutdown_timeout_cuts_a_long_stream_and_a_pending_answer(tiny_model):
    """``--shutdown-timeout 1``: a stream of 3000 tokens (many seconds) ends with an error event and [DONE], a
    non-streamed request with 503, and the server exits 0 soon after the second."""
    server = _serve(tiny_model, "--shutdown-timeout", "1")
    try:
        held = _HalfSentRequest(server, max_tokens=8)  # never finished: still unanswered when the drain ends
        (stream,) = _start_streams(server, 1, max_tokens=3000)
        signalled = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        _assert_cut(stream, 3000)
        status, headers, body = _read_response(held.sock)
        assert status == 503 and body["error"]["code"] == "shutting_down", body
        assert server.proc.wait(60) == 0, server.output()[-3000:]
        assert time.monotonic() - signalled < 1 + 15
        assert "0 request(s) finished, 2 cut" in server.output(), server.output()[-3000:]
    finally:
        server.stop()


def test_a_second_signal_ends_the_drain_at_once(tiny_model):
    """The default 30 s drain, cut by a SIGINT after the SIGTERM: the stream ends with the error event, exit 0."""
    server = _serve(tiny_model)
    try:
        (stream,) = _start_streams(server, 1, max_tokens=3000)
        os.kill(server.proc.pid, signal.SIGTERM)
        _wait_for_refusal(server)
        second = time.monotonic()
        os.kill(server.proc.pid, signal.SIGINT)
        _assert_cut(stream, 3000)
        assert server.proc.wait(60) == 0, server.output()[-3000:]
        assert time.monotonic() - second < 15
        assert "SIGINT during the drain" in server.output()
    finally:
        server.stop()


@pytest.mark.slow
def test_engine_death_turns_health_503_and_exits_non_zero(tiny_model):
    """A tensor-parallel worker killed mid-stream ends the engine's step loop: the stream ends with an error,
    new requests and /health get 503, and the server exits 1 (a supervisor restarts it) once what was in
    flight has ended."""
    server = _serve(tiny_model, "--executor", "mp", "--tp", "2", *_NO_REBUILD_ARGS)
    try:
        workers = worker_processes(server.proc.pid)
        assert len(workers) == 2, workers
        held = _HalfSentRequest(server, max_tokens=8)  # keeps the server up while the test looks
        (stream,) = _start_streams(server, 1, max_tokens=3000)
        workers[-1].kill()

        events, last = stream.result(60)
        assert last == "[DONE]" and "error" in events[-1], events[-1:]
        refused = _wait_for_refusal(server)
        _assert_refused(refused.status_code, dict(refused.headers), refused.json(), "engine_dead")
        assert server.proc.poll() is None
        health = httpx.get(server.base_url + "/health", timeout=30)
        assert health.status_code == 503, health.text

        status, _, body = held.finish()
        assert status == 503 and body["error"]["code"] == "engine_dead", body
        assert server.proc.wait(60) == 1, server.output()[-3000:]
        assert "the engine can no longer serve" in server.output()
    finally:
        server.stop()


def test_remote_engine_reports_a_dead_actor():
    """``serve --name``: the engine lives in a Ray actor. ``RemoteEngine.is_running`` never blocks (it starts a
    question and answers from the last reply): an actor that answers late is not dead, a gone actor is, and so is
    one whose engine stopped."""
    from types import SimpleNamespace

    from ray.exceptions import RayActorError

    from dist_infer.entrypoints.openai.shutdown import engine_failure
    from dist_infer.entrypoints.ray_service import RemoteEngine

    class Method:
        def __init__(self, answer):
            self.answer = answer

        def remote(self):
            async def call():
                if isinstance(self.answer, BaseException):
                    raise self.answer
                return self.answer
            return call()

    async def asked(engine, answer) -> bool:
        engine.handle.actor.engine_error = Method(answer)
        engine.is_running  # starts the question
        await engine._probing
        return engine.is_running

    async def main():
        engine = RemoteEngine.__new__(RemoteEngine)  # no tokenizer needed here
        engine.handle, engine._error, engine._probing = SimpleNamespace(actor=SimpleNamespace()), None, None
        assert await asked(engine, None) and engine_failure(engine) is None
        assert await asked(engine, TimeoutError("slow node"))  # no answer is not a death
        assert not await asked(engine, RayActorError())
        assert "the engine actor is gone" in engine_failure(engine)[0]
        engine._error = None
        assert not await asked(engine, "the engine actor's step loop failed with RuntimeError")
        assert engine_failure(engine) == ("the engine actor's step loop failed with RuntimeError", None)

    asyncio.run(main())


def test_shutdown_timeout_from_flag_or_config_and_the_exit_code(monkeypatch, tmp_path):
    """``--shutdown-timeout`` and the config's ``server.shutdown_timeout`` reach the settings (> 0 only), and
    ``serve`` exits with what the server returns (1 after an engine death)."""
    import logging

    from dist_infer.entrypoints import cli
    from dist_infer.entrypoints.openai import api_server

    seen = {}
    monkeypatch.setattr(api_server, "run_server", lambda engine_args, settings, *rest: seen.update(settings=settings)
                        or seen.get("code", 0))
    monkeypatch.delenv("DIST_INFER_API_KEY", raising=False)
    root_level = logging.getLogger().level
    try:
        assert cli.main(["serve"]) == 0 and seen["settings"].shutdown_timeout_s == 30
        assert cli.main(["serve", "--shutdown-timeout", "7.5"]) == 0 and seen["settings"].shutdown_timeout_s == 7.5
        config = tmp_path / "server.yaml"
        config.write_text("server:\n  shutdown_timeout: 12\n")
        assert cli.main(["serve", "--config", str(config)]) == 0 and seen["settings"].shutdown_timeout_s == 12
        seen.clear()
        assert cli.main(["serve", "--shutdown-timeout", "0"]) == 1 and "settings" not in seen
        seen["code"] = 1
        assert cli.main(["serve"]) == 1
    finally:
        logging.getLogger().setLevel(root_level)
