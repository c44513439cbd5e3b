"""Health checks of idle replicas (``engine.health``): a worker that dies or hangs while its replica has no
step in flight is found without any request or ``/ready`` call, and the replica is rebuilt; a hung worker
stalls neither the engine thread nor ``/ready`` and ``/metrics``' worker timings, which wait for their calls
off the engine thread. Unit tests on fake workers, then one ``mp`` engine (dp=2) with real SIGKILL and
SIGSTOP."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import AsyncLLMEngine, SamplingParams
from dist_infer.engine.health import HealthChecker
from dist_infer.engine.replica import Replica, ReplicaState
from parallel_helpers import pid_alive, wait_until

# ---- the checker alone, on fake workers ---------------------------------------------------------------------


class _FakeWorkers:
    """Two ranks per replica; each ping's future is kept for the test to settle (or leave silent)."""

    def __init__(self):
        self.layout = SimpleNamespace(replica_ranks=lambda d: [2 * d, 2 * d + 1])
        self.calls: list[tuple[str, list[int], list[Future]]] = []

    def start_rpc(self, method, args=(), kwargs=None, ranks=None):
        futures = [Future() for _ in ranks]
        self.calls.append((method, list(ranks), futures))
        return futures


def _replica(index, busy=False, state=ReplicaState.SERVING, at=0.0):
    replica = Replica(index, state, SimpleNamespace(oldest=Future() if busy else None))
    replica.changed_at = at
    return replica


def test_only_idle_serving_replicas_are_pinged_and_only_once_per_period():
    workers = _FakeWorkers()
    checker = HealthChecker(workers, period_s=5.0, timeout_s=30.0)
    idle, busy, draining = _replica(0), _replica(1, busy=True), _replica(2, state=ReplicaState.DRAINING)
    replicas = [idle, busy, draining]
    assert checker.tick(replicas, now=4.9, periodic=True) == [] and workers.calls == []  # not due yet
    assert checker.tick(replicas, now=5.0, periodic=True) == []
    assert [(m, r) for m, r, _ in workers.calls] == [("ping", [0, 1])]  # the idle one, both its workers
    assert checker.tick(replicas, now=6.0, periodic=True) == [] and len(workers.calls) == 1  # one in flight
    for future in workers.calls[0][2]:
        future.set_result(0)
    assert checker.tick(replicas, now=7.0, periodic=True) == [] and len(workers.calls) == 1  # answered at 7
    assert checker.tick(replicas, now=11.9, periodic=True) == [] and len(workers.calls) == 1
    checker.tick(replicas, now=12.0, periodic=True)
    assert len(workers.calls) == 2  # the next period
    [(failed, _)] = checker.tick(replicas, now=100.0, periodic=False)  # judged, nothing new started
    assert failed is idle and len(workers.calls) == 2


def test_a_failed_ping_fails_the_replica_at_once_and_wakes_the_engine():
    workers, woken = _FakeWorkers(), []
    checker = HealthChecker(workers, period_s=1.0, timeout_s=30.0, on_error=lambda: woken.append(True))
    replica = _replica(0)
    checker.tick([replica], now=1.0, periodic=True)
    workers.calls[0][2][0].set_result(0)
    assert woken == []
    workers.calls[0][2][1].set_exception(RuntimeError("worker rank 1 died (exit code -9)"))
    assert woken == [True]
    [(failed, error)] = checker.tick([replica], now=1.1, periodic=True)
    assert failed is replica and "exit code -9" in str(error)


def test_a_silent_worker_fails_its_replica_after_the_timeout_naming_its_rank():
    workers = _FakeWorkers()
    checker = HealthChecker(workers, period_s=1.0, timeout_s=30.0)
    replica = _replica(1)
    checker.tick([replica], now=1.0, periodic=True)
    workers.calls[0][2][0].set_result(2)  # rank 2 answers, rank 3 never does
    assert checker.tick([replica], now=30.9, periodic=True) == []
    [(failed, error)] = checker.tick([replica], now=31.0, periodic=True)
    assert failed is replica and isinstance(error, TimeoutError) and "[3]" in str(error)
    assert "[2]" not in str(error)


def test_a_probe_of_a_replaced_incarnation_is_dropped_and_a_probe_in_flight_is_shared():
    workers = _FakeWorkers()
    checker = HealthChecker(workers, period_s=1.0, timeout_s=5.0)
    replica = _replica(0)
    first = checker.probe(replica, now=0.0)
    assert checker.probe(replica, now=0.5) is first and len(workers.calls) == 1
    replica.core = SimpleNamespace(oldest=None)  # rebuilt: the old workers' silence says nothing now
    replica.changed_at = 10.0
    assert checker.tick([replica], now=10.0, periodic=True) == []
    assert checker.tick([replica], now=10.5, periodic=True) == [] and len(workers.calls) == 1
    checker.tick([replica], now=11.0, periodic=True)
    assert len(workers.calls) == 2  # the new incarnation is checked one period after it started serving


# ---- a real engine: mp, dp=2 -----------------------------------------------------------------------------------

STEP_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = save_tiny_model(tiny_llama_config(num_hidden_layers=2), tmp_path_factory.mktemp("health"))
    engine = AsyncLLMEngine.from_engine_args(
        model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, max_num_seqs=4,
        distributed_executor_backend="mp", data_parallel_size=2, worker_timeout_s=STEP_TIMEOUT_S,
        replica_restart_backoff_s=0.1, health_check_period_s=0.3)
    yield engine
    engine.shutdown()


def _run(coro):
    return asyncio.run(coro)


def _pid(engine, replica: int) -> int:
    rank = engine.engine.executor.layout.replica_ranks(replica)[0]
    return engine.engine.executor.collective_rpc("memory_report", ranks=[rank])[0]["pid"]


def _events(engine, replica: int):
    return engine.engine.replicas.replicas[replica].events


def _serving_again(engine, replica: int, failures: int):
    return lambda: (_events(engine, replica).failures == failures and _events(engine, replica).rebuilds == failures
                    and engine.replica_states().get(replica) == "serving")


async def _greedy(engine, replica: int | None = None) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    final = None
    async for output in engine.generate({"prompt_token_ids": [5, 6, 7]}, params, replica=replica):
        final = output
    return final.outputs[0].token_ids


def test_a_worker_killed_while_idle_is_found_without_any_request_and_its_replica_rebuilt(engine):
    reference = _run(_greedy(engine))
    victim = _pid(engine, 1)
    os.kill(victim, signal.SIGKILL)
    # Nothing is sent to the engine: only its health checks can notice.
    assert wait_until(_serving_again(engine, 1, failures=1), 60), (engine.replica_states(), _events(engine, 1))
    assert not pid_alive(victim) and _pid(engine, 1) != victim
    assert "exit code -9" in _events(engine, 1).last_error  # reported as the death it was
    assert _run(_greedy(engine, replica=1)) == reference


def test_a_hung_idle_worker_stalls_neither_ready_nor_metrics_and_its_replica_is_rebuilt(engine):
    reference = _run(_greedy(engine))
    failures = _events(engine, 1).failures
    victim = _pid(engine, 1)
    os.kill(victim, signal.SIGSTOP)
    try:
        async def while_hung():
            started = time.monotonic()
            timings = await engine.worker_timings(timeout=1.0)
            timings_s = time.monotonic() - started
            started = time.monotonic()
            ready = await engine.check_ready(timeout=2.0)
            ready_s = time.monotonic() - started
            tokens = await _greedy(engine, replica=0)  # the healthy replica serves meanwhile
            return timings, timings_s, ready, ready_s, tokens

        timings, timings_s, ready, ready_s, tokens = _run(while_hung())
        # Both answer within their own bounds, well before the hung worker's step timeout.
        assert timings_s < STEP_TIMEOUT_S / 2 and ready_s < STEP_TIMEOUT_S / 2, (timings_s, ready_s)
        assert [t["dp_rank"] for t in timings] == [0], timings  # the silent worker is left out
        assert ready["status"] == "degraded", ready
        assert tokens == reference
        # After the step timeout the silent worker's replica fails as hung and is rebuilt.
        assert wait_until(_serving_again(engine, 1, failures=failures + 1), 60), _events(engine, 1)
        assert "did not answer a health check" in _events(engine, 1).last_error
    finally:
        if pid_alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert _run(_greedy(engine, replica=1)) == reference
    assert _run(engine.check_ready(timeout=30.0))["status"] == "ready"
