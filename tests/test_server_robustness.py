"""Malformed and hostile requests get their exact 4xx in OpenAI's shape and never wedge the server; a flood of
streams all end in an answer or a 429 and never overfill the queue; a client that leaves aborts its request,
streamed or not; metrics parse and move; /ready tells the truth when a worker dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import ServerProcess, worker_processes

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

# (path, body, the status the server answers): every field error is a 400 naming the field, an unknown model
# 404, a body over --max-request-bytes 413.
MALFORMED = [
    (CHAT, b"{not json", 400), (CHAT, b"", 400), (CHAT, b"[1, 2, 3]", 400),
    (CHAT, json.dumps("just a string").encode(), 400),
    (CHAT, {"model": MODEL}, 400), (CHAT, {"messages": [{"role": "user", "content": "x"}]}, 400),
    (CHAT, {"model": MODEL, "messages": []}, 400), (CHAT, {"model": MODEL, "messages": "hello"}, 400),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    (CHAT, {"model": MODEL, "messages": [{"content": "x"}]}, 400),
    (CHAT, {**GOOD_CHAT, "max_tokens": -5}, 400), (CHAT, {**GOOD_CHAT, "max_tokens": 0}, 400),
    (CHAT, {**GOOD_CHAT, "max_tokens": 10**12}, 400), (CHAT, {**GOOD_CHAT, "max_tokens": "many"}, 400),
    (CHAT, {**GOOD_CHAT, "temperature": -1}, 400), (CHAT, {**GOOD_CHAT, "temperature": "hot"}, 400),
    (CHAT, {**GOOD_CHAT, "top_p": 0}, 400), (CHAT, {**GOOD_CHAT, "top_p": 7}, 400), (CHAT, {**GOOD_CHAT, "n": 0}, 400),
    (CHAT, {**GOOD_CHAT, "n": 10**6}, 400), (CHAT, {**GOOD_CHAT, "seed": 10**40}, 400),
    (CHAT, {**GOOD_CHAT, "stop": [""]}, 400), (CHAT, {**GOOD_CHAT, "stop": ["x"] * 100}, 400),
    (CHAT, {**GOOD_CHAT, "logprobs": True, "top_logprobs": 99}, 400),
    (CHAT, {**GOOD_CHAT, "model": "no-such-model"}, 404), (CHAT, {**GOOD_CHAT, "tools": [{"type": "function"}]}, 400),
    (CHAT, {**GOOD_CHAT, "stream": "yes"}, 400), (CHAT, {**GOOD_CHAT, "frequency_penalty": 5.0}, 400),
    (CHAT, {**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400),
    (CMPL, {"model": MODEL}, 400), (CMPL, {"model": MODEL, "prompt": []}, 400),
    (CMPL, {"model": MODEL, "prompt": [[]]}, 400), (CMPL, {"model": MODEL, "prompt": [10**9]}, 400),
    (CMPL, {"model": MODEL, "prompt": -3}, 400), (CMPL, {"model": MODEL, "prompt": "x" * 20000, "max_tokens": 5}, 400),
    (CMPL, {"model": MODEL, "prompt": "x", "max_tokens": 2048}, 400),
    (CMPL, {"model": MODEL, "prompt": "x", "logprobs": 50}, 400),
    (CMPL, {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),  # scoring only the prompt needs echo
    (CMPL, {"model": MODEL, "prompt": {"a": 1}}, 400), (CMPL, b"x" * (2 << 20), 413),
    # hostile: nesting that overflows a recursive parser, and lone surrogates the tokenizer cannot take
    (CMPL, b"[" * 100_000 + b"]" * 100_000, 400),
    (CMPL, b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (CMPL, b'{"model": "' + MODEL.encode() + b'", "prompt": "abc \\ud800 def"}', 400),
    (CMPL, b'{"model": "' + MODEL.encode() + b'", "prompt": ["ok", "\\udfff"]}', 400),
    (CHAT, b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400),
    (CHAT, b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": '
           b'[{"type": "text", "text": "\\udc00"}]}]}', 400),
]


@pytest.fixture(scope="module")
def server(default_model_path):
    server = ServerProcess("--max-model-len", "2048", "--kv-cache-memory", str(1 << 28), "--max-waiting", "50")
    yield server
    server.stop()


@pytest.mark.parametrize("path,body,status", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_get_their_status(server, path, body, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.base_url + path, content=content, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_hostile_input_names_the_problem(server):
    deep = httpx.post(server.base_url + CMPL, content=b"[" * 100_000, timeout=60,
                      headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "nested more than" in deep.json()["error"]["message"]
    surrogate = httpx.post(server.base_url + CMPL, timeout=60, headers={"content-type": "application/json"},
                           content=b'{"model": "' + MODEL.encode() + b'", "prompt": ["ok", "x\\ud800"]}')
    error = surrogate.json()["error"]
    assert surrogate.status_code == 400 and error["code"] == "invalid_unicode" and error["param"] == "prompt[1]"
    assert "lone surrogate" in error["message"]
    assert _value(_samples(server), "dist_infer_requests_total", status="500") == 0


def test_server_still_answers_after_the_fuzz(server):
    response = httpx.post(server.base_url + CHAT, json=GOOD_CHAT, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


def test_flood_of_streams_all_end_in_an_answer(server):
    """200 concurrent streaming requests against --max-waiting 50: each completes or gets 429, none hangs, some
    are refused, and the engine's waiting queue never holds more than 50 (sampled from /metrics throughout)."""

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": 8, "stream": True, "temperature": 0}
        async with client.stream("POST", server.base_url + CMPL, json=body, timeout=600) as response:
            if response.status_code == 429:
                assert response.headers.get("retry-after")
                return "rejected"
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            finishes = [json.loads(l[6:])["choices"][0]["finish_reason"] for l in lines[:-1]]
            return "completed" if finishes[-1] == "length" else f"odd: {finishes[-1]}"

    async def main():
        peak, done = 0.0, asyncio.Event()

        async def watch(client: httpx.AsyncClient) -> None:
            nonlocal peak
            while not done.is_set():
                text = (await client.get(server.base_url + "/metrics", timeout=60)).text
                peak = max([peak] + [s.value for family in text_string_to_metric_families(text)
                                     for s in family.samples if s.name == "dist_infer_num_requests_waiting"])
                await asyncio.sleep(0.02)

        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as client:
            watcher = asyncio.create_task(watch(client))
            try:
                return await asyncio.gather(*(one(client, i) for i in range(200))), peak
            finally:
                done.set()
                await watcher

    outcomes, peak = asyncio.run(main())
    assert len(outcomes) == 200
    assert set(outcomes) <= {"completed", "rejected"}, [o for o in outcomes if o.startswith("odd")]
    assert outcomes.count("completed") >= 50  # the queue admits at least its own size
    assert outcomes.count("rejected") >= 1, "200 streams at once never filled a queue of 50"
    assert peak <= 50, f"{peak} requests waited with --max-waiting 50"
    print(f"completed={outcomes.count('completed')} rejected={outcomes.count('rejected')}")


def _drained(server) -> bool:
    samples = _samples(server)
    return (_value(samples, "dist_infer_num_requests_running") == 0
            and _value(samples, "dist_infer_num_requests_waiting") == 0
            and _value(samples, "dist_infer_kv_cache_usage_ratio") == 0)


def _generated(server) -> float:
    return _value(_samples(server), "dist_infer_replica_generation_tokens_total")


def _wait_until_drained(server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _drained(server):
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.2)


def test_client_disconnect_aborts_and_frees_blocks(server):
    """Leaving a stream mid-way aborts it: the engine drains with far fewer tokens generated than asked for
    (a request that ran to its end would have generated all 1500)."""
    before = _generated(server)
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.base_url + CMPL, json=body, timeout=60) as response:
        finishes = []
        for line in response.iter_lines():
            if line.startswith("data: {"):
                finishes.append(json.loads(line[6:])["choices"][0]["finish_reason"])
            if len(finishes) >= 6:
                break  # leave mid-stream; closing the connection should abort the request
    assert finishes == [None] * 6  # it was still running when the client left
    _wait_until_drained(server, 30)
    assert _generated(server) - before < 1500


def test_non_streamed_request_is_aborted_when_its_client_leaves(server):
    """A non-streamed n=4 x 1500-token request, its connection closed once the engine runs it: the server notices
    the disconnect, aborts all four engine requests (KV blocks freed, far fewer than 6000 tokens generated) and
    counts a 499."""
    assert _drained(server)
    gone = dict(endpoint=CMPL, status="499")
    before_tokens, before_499 = _generated(server), _value(_samples(server), "dist_infer_requests_total", **gone)
    body = json.dumps({"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "n": 4,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 60
    while _value(_samples(server), "dist_infer_num_requests_running") < 4:  # all four choices are running
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.1)
    sock.close()
    _wait_until_drained(server, 30)
    assert _generated(server) - before_tokens < 4 * 1500
    assert _value(_samples(server), "dist_infer_requests_total", **gone) == before_499 + 1


def _samples(server) -> dict:
    text = httpx.get(server.base_url + "/metrics", timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_metrics_parse_and_move(server):
    before = _samples(server)
    for _ in range(3):
        assert httpx.post(server.base_url + CHAT, json=GOOD_CHAT, timeout=60).status_code == 200
    after = _samples(server)
    ok = dict(endpoint=CHAT, status="200")
    assert _value(after, "dist_infer_requests_total", **ok) == _value(before, "dist_infer_requests_total", **ok) + 3
    assert _value(after, "dist_infer_generation_tokens_total") > _value(before, "dist_infer_generation_tokens_total")
    assert _value(after, "dist_infer_time_to_first_token_seconds_count") >= \
        _value(before, "dist_infer_time_to_first_token_seconds_count") + 3
    assert _value(after, "dist_infer_stage_compute_seconds_total", stage="0") > 0
    assert ("dist_infer_kv_cache_usage_ratio", (("model", MODEL), ("replica", "0"))) in after


@pytest.mark.slow
def test_ready_turns_503_when_a_worker_dies(tiny_llama_with_tokenizer):
    """Also: the streams the death ends each log one line, the shared error's traceback once (it used to be
    logged per stream, longer each time: quadratic log volume)."""
    # The only replica fails; its rebuild waits out a long backoff, and its requests may wait for a replica 1 s.
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--pp", "2", "--kv-cache-memory", str(1 << 22),
                           "--replica-restart-backoff", "600", "--no-replica-timeout", "1")
    try:
        ready = httpx.get(server.base_url + "/ready", timeout=120)
        assert ready.status_code == 200, ready.text
        metrics = httpx.get(server.base_url + "/metrics", timeout=60).text
        pids = _worker_pids(server.proc.pid)
        assert len(pids) == 2, pids
        model = os.path.basename(tiny_llama_with_tokenizer)
        body = {"model": model, "prompt": "Go on", "max_tokens": 400, "ignore_eos": True, "stream": True}

        async def streams(n: int) -> list[str]:
            async with httpx.AsyncClient(timeout=120) as client:
                async def one() -> str:
                    async with client.stream("POST", server.base_url + CMPL, json=body) as response:
                        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
                        return lines[-2]

                tasks = [asyncio.create_task(one()) for _ in range(n)]
                while _value(_samples(server), "dist_infer_num_requests_running") < n:
                    await asyncio.sleep(0.05)
                os.kill(pids[-1], signal.SIGKILL)
                return await asyncio.gather(*tasks)

        lasts = asyncio.run(streams(8))
        assert all('"replica_failure"' in last for last in lasts), lasts
        response = httpx.get(server.base_url + "/ready", timeout=120)
        assert response.status_code == 503
        assert response.json()["error"] == "no replica is serving (replicas: 0: failed)"
        assert httpx.get(server.base_url + "/health", timeout=60).status_code == 200  # it can still recover
        assert "dist_infer_stage_idle_ratio" in metrics
        log = server.output()
        assert log.count(" failed") >= 8 and log.count("Traceback (most recent call last)") <= 2, log[-4000:]
        assert len(log.splitlines()) < 200, len(log.splitlines())
    finally:
        server.stop()


def _worker_pids(server_pid: int) -> list[int]:
    return sorted(c.pid for c in worker_processes(server_pid))
