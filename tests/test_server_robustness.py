"""Malformed requests get 4xx and never wedge the server; a flood of streams all end in an answer; metrics
parse and move; /ready tells the truth when a worker dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

MALFORMED = [
    (CHAT, b"{not json"), (CHAT, b""), (CHAT, b"[1, 2, 3]"), (CHAT, json.dumps("just a string").encode()),
    (CHAT, {"model": MODEL}), (CHAT, {"messages": [{"role": "user", "content": "x"}]}),
    (CHAT, {"model": MODEL, "messages": []}), (CHAT, {"model": MODEL, "messages": "hello"}),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
    (CHAT, {"model": MODEL, "messages": [{"content": "x"}]}),
    (CHAT, {**GOOD_CHAT, "max_tokens": -5}), (CHAT, {**GOOD_CHAT, "max_tokens": 0}),
    (CHAT, {**GOOD_CHAT, "max_tokens": 10**12}), (CHAT, {**GOOD_CHAT, "max_tokens": "many"}),
    (CHAT, {**GOOD_CHAT, "temperature": -1}), (CHAT, {**GOOD_CHAT, "temperature": "hot"}),
    (CHAT, {**GOOD_CHAT, "top_p": 0}), (CHAT, {**GOOD_CHAT, "top_p": 7}), (CHAT, {**GOOD_CHAT, "n": 0}),
    (CHAT, {**GOOD_CHAT, "n": 10**6}), (CHAT, {**GOOD_CHAT, "seed": 10**40}), (CHAT, {**GOOD_CHAT, "stop": [""]}),
    (CHAT, {**GOOD_CHAT, "stop": ["x"] * 100}), (CHAT, {**GOOD_CHAT, "logprobs": True, "top_logprobs": 99}),
    (CHAT, {**GOOD_CHAT, "model": "no-such-model"}), (CHAT, {**GOOD_CHAT, "unknown_field": 1}),
    (CHAT, {**GOOD_CHAT, "stream": "yes"}), (CHAT, {**GOOD_CHAT, "frequency_penalty": 1.0}),
    (CHAT, {**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
    (CMPL, {"model": MODEL}), (CMPL, {"model": MODEL, "prompt": []}), (CMPL, {"model": MODEL, "prompt": [[]]}),
    (CMPL, {"model": MODEL, "prompt": [10**9]}), (CMPL, {"model": MODEL, "prompt": -3}),
    (CMPL, {"model": MODEL, "prompt": "x" * 20000, "max_tokens": 5}),
    (CMPL, {"model": MODEL, "prompt": "x", "max_tokens": 2048}), (CMPL, {"model": MODEL, "prompt": "x", "logprobs": 50}),
    (CMPL, {"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}), (CMPL, {"model": MODEL, "prompt": {"a": 1}}),
    (CMPL, b"x" * (2 << 20)),
]


@pytest.fixture(scope="module")
def server(default_model_path):
    server = ServerProcess("--max-model-len", "2048", "--kv-cache-memory", str(1 << 28), "--max-waiting", "50")
    yield server
    server.stop()


@pytest.mark.parametrize("path,body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_get_4xx(server, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.base_url + path, content=content, headers={"content-type": "application/json"},
                          timeout=60)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_server_still_answers_after_the_fuzz(server):
    response = httpx.post(server.base_url + CHAT, json=GOOD_CHAT, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


def test_flood_of_streams_all_end_in_an_answer(server):
    """200 concurrent streaming requests against --max-waiting 50: each completes or gets 429; none hangs."""

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
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    outcomes = asyncio.run(main())
    assert len(outcomes) == 200
    assert set(outcomes) <= {"completed", "rejected"}, [o for o in outcomes if o.startswith("odd")]
    assert outcomes.count("completed") >= 50  # the queue admits at least its own size
    print(f"completed={outcomes.count('completed')} rejected={outcomes.count('rejected')}")


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.base_url + CMPL, json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 6:
                break  # leave mid-stream; closing the connection should abort the request
    def drained():
        samples = _samples(server)
        return (_value(samples, "dist_infer_num_requests_running") == 0
                and _value(samples, "dist_infer_kv_cache_usage_ratio") == 0)
    deadline = time.monotonic() + 20  # finishing its 1500 tokens would take far longer than this
    while not drained():
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.2)


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
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--pp", "2", "--kv-cache-memory", str(1 << 22))
    try:
        ready = httpx.get(server.base_url + "/ready", timeout=120)
        assert ready.status_code == 200, ready.text
        metrics = httpx.get(server.base_url + "/metrics", timeout=60).text
        pids = _worker_pids(server.proc.pid)
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        response = httpx.get(server.base_url + "/ready", timeout=120)
        assert response.status_code == 503
        assert "worker rank" in response.json()["error"]
        assert "dist_infer_stage_idle_ratio" in metrics
    finally:
        server.stop()


def _worker_pids(server_pid: int) -> list[int]:
    """The server's worker processes (its children running the worker entry point)."""
    import psutil

    children = psutil.Process(server_pid).children(recursive=True)
    return sorted(c.pid for c in children if "spawn_main" in " ".join(c.cmdline()))
