"""The replica count of a running server, by hand: ``/admin/replicas`` (an authenticated route) reports each
replica and sets how many run; new replicas start while the server serves, surplus ones drain, and ``/ready``
and ``/metrics`` follow."""

from __future__ import annotations

import time

import httpx
import pytest

from server_helpers import ServerProcess

KEY = "sk-admin-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama_with_tokenizer):
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--kv-cache-memory", str(1 << 22), "--executor", "mp", "--served-model-name", "tiny",
                           "--drain-timeout", "30", env={"DIST_INFER_API_KEY": KEY})
    yield server
    server.stop()


def _states(server) -> dict[int, str]:
    reply = httpx.get(f"{server.base_url}/admin/replicas", headers=AUTH, timeout=30)
    assert reply.status_code == 200, reply.text
    return {r["replica"]: r["state"] for r in reply.json()["replicas"]}


def _wait_states(server, expected: dict[int, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (states := _states(server)) != expected:
        assert time.monotonic() < deadline, f"replicas {states}, expected {expected}"
        time.sleep(0.2)


def _complete(server, prompt: str) -> dict:
    reply = httpx.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_admin_route_needs_a_key_and_valid_counts(server):
    assert httpx.get(f"{server.base_url}/admin/replicas", timeout=30).status_code == 401
    assert httpx.post(f"{server.base_url}/admin/replicas", json={"replicas": 2}, timeout=30).status_code == 401
    for bad in (0, -1, "two", 1.5, None, True):
        reply = httpx.post(f"{server.base_url}/admin/replicas", headers=AUTH, json={"replicas": bad}, timeout=30)
        assert reply.status_code == 400, (bad, reply.text)
        assert reply.json()["error"]["param"] == "replicas"
    assert _states(server) == {0: "serving"}


def test_scale_out_and_in_by_hand_while_serving(server):
    reply = httpx.post(f"{server.base_url}/admin/replicas", headers=AUTH, json={"replicas": 2}, timeout=30)
    assert reply.status_code == 200 and reply.json()["replicas"] == 2
    assert reply.json()["states"]["1"] in ("starting", "serving")
    ready = httpx.get(f"{server.base_url}/ready", headers=AUTH, timeout=60)
    assert ready.status_code == 200 and ready.json()["status"] in ("degraded", "ready")  # replica 0 serves meanwhile
    _wait_states(server, {0: "serving", 1: "serving"})
    assert httpx.get(f"{server.base_url}/ready", headers=AUTH, timeout=60).json() == \
        {"status": "ready", "replicas": {"0": "serving", "1": "serving"}}
    # Idle replicas take turns, so both get work.
    answers = [_complete(server, f"request number {i}") for i in range(6)]
    assert all(a["choices"][0]["finish_reason"] == "length" for a in answers)
    metrics = httpx.get(f"{server.base_url}/metrics", headers=AUTH, timeout=30).text
    routed = {line.split('replica="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("dist_infer_replica_requests_total{")}
    assert routed.get("1", 0) >= 3, routed
    # Back to one: replica 1 drains and stops; requests keep being answered.
    reply = httpx.post(f"{server.base_url}/admin/replicas", headers=AUTH, json={"replicas": 1}, timeout=30)
    assert reply.status_code == 200
    _complete(server, "during the drain")
    _wait_states(server, {0: "serving", 1: "stopped"})
    metrics = httpx.get(f"{server.base_url}/metrics", headers=AUTH, timeout=30).text
    assert 'dist_infer_replica_state{model="tiny",replica="1",state="stopped"} 1.0' in metrics
    assert 'dist_infer_replica_up{model="tiny",replica="1"} 0.0' in metrics
    assert "replica 1 drained and stopped" in server.output()
