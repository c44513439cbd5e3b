"""A data-parallel replica fails alone: a worker killed (SIGKILL), hung (its step never returns) or raising
mid-generation makes its replica fail, the replica's requests move to the healthy replica and finish with
exactly the tokens an undisturbed run gives (greedy and seeded sampling), and the replica is rebuilt (new
processes or actors) and serves again. Under ``mp`` and ``ray``, dp=2 x tp=2 on a tiny model."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, RequestFailedError, SamplingParams
from parallel_helpers import arm_step_failure, finish_after_fault, hang_in_step, pid_alive, wait_until

STEP_TIMEOUT_S = 6.0  # a replica silent this long is hung (the healthy one keeps finishing steps meanwhile)
BOUND_S = 90


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(num_hidden_layers=2), tmp_path_factory.mktemp("failover"))


@pytest.fixture(scope="module", params=["mp", "ray"])
def llm(request, tiny_path):
    if request.param == "ray":
        import ray
        import parallel_helpers

        ray.cloudpickle.register_pickle_by_value(parallel_helpers)  # Ray workers cannot import the tests
        from dist_infer.executor.ray_cluster import start_private

        start_private(num_cpus=8)
    engine = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, max_num_seqs=4,
                 distributed_executor_backend=request.param, data_parallel_size=2, tensor_parallel_size=2,
                 worker_timeout_s=STEP_TIMEOUT_S, replica_restart_backoff_s=0.1)
    yield engine
    engine.shutdown()
    if request.param == "ray":
        import ray

        ray.shutdown()


def _workload():
    """Eight requests, half greedy and half seeded sampling, long enough to be mid-generation at the fault."""
    prompts = [{"prompt_token_ids": [(7 * i + j) % 120 + 2 for j in range(5 + 3 * i)]} for i in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=48, ignore_eos=True)
              for i in range(8)]
    return prompts, params


@pytest.fixture(scope="module")
def reference(llm):
    prompts, params = _workload()
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _pids(llm, replica: int) -> list[int]:
    ranks = llm.engine.executor.layout.replica_ranks(replica)
    return [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report", ranks=ranks)]


def _kill(llm, rank):
    os.kill(llm.engine.executor.collective_rpc("memory_report", ranks=[rank])[0]["pid"], signal.SIGKILL)


FAULTS = {
    "sigkill": _kill,
    "hang": lambda llm, rank: llm.engine.executor.collective_rpc(hang_in_step, ranks=[rank]),
    "raise": lambda llm, rank: llm.engine.executor.collective_rpc(arm_step_failure, (0,), ranks=[rank]),
}


# A raise travels the same way under both backends; a death and a hang each look different to mp and Ray.
@pytest.mark.parametrize("llm,fault", [("mp", "sigkill"), ("mp", "hang"), ("mp", "raise"), ("ray", "sigkill"),
                                       ("ray", "hang")], indirect=["llm"], scope="module")
def test_a_failed_replica_loses_no_request_and_is_rebuilt(llm, reference, fault):
    engine = llm.engine
    # The engine is shared by the module's tests: an earlier one may have left a replica being rebuilt.
    assert wait_until(lambda: engine.step() == [] and engine.replica_states() == {0: "serving", 1: "serving"},
                      timeout=BOUND_S)
    replica = engine.replicas.replicas[1]
    failures_before, old_pids = replica.events.failures, _pids(llm, 1)
    prompts, params = _workload()
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"{fault}-{i}", prompt, p)
    finished = {}
    for _ in range(4):  # both replicas are generating
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    held = engine.replicas.replicas[1].core.scheduler.num_unfinished
    assert held > 0 and not finished, "replica 1 must hold requests in mid-generation when the fault lands"
    FAULTS[fault](llm, engine.executor.layout.rank(1, 0, 1))  # replica 1's tensor-parallel rank 1
    finish_after_fault(engine, finished, BOUND_S)
    # Nothing lost, nothing repeated, nothing changed: greedy and seeded outputs as undisturbed.
    assert [finished[f"{fault}-{i}"].outputs[0].token_ids for i in range(8)] == reference
    assert replica.events.failures == failures_before + 1
    assert replica.events.migrations >= held
    # The replica comes back with new workers and serves again.
    assert wait_until(lambda: engine.step() == [] and engine.replica_states()[1] == "serving", timeout=BOUND_S)
    new_pids = _pids(llm, 1)
    assert not set(new_pids) & set(old_pids)
    assert wait_until(lambda: not any(pid_alive(p) for p in old_pids), timeout=30), "the failed workers remain"
    engine.add_request(f"{fault}-again", prompts[0], params[0], replica=1)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.outputs[0].token_ids for o in outputs] == [reference[0]]


def test_past_the_migration_limit_a_request_ends_with_an_error(tiny_path):
    """With no rebuild and no healthy replica left, an accepted request ends with a clear error, not a hang."""
    llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="mp",
              tensor_parallel_size=2, max_replica_restarts=0)
    try:
        pid = llm.engine.executor.collective_rpc("memory_report", ranks=[1])[0]["pid"]
        llm.engine.executor.collective_rpc(arm_step_failure, (2,), ranks=[1])
        with pytest.raises(RequestFailedError, match=r"worker rank 1 \(dp 0, pp 0, tp 1\) failed in execute_model:"
                                                     r".*injected"):
            llm.generate(_workload()[0][:2], SamplingParams(max_tokens=20), use_tqdm=False)
        with pytest.raises(RuntimeError, match="every replica has failed"):
            llm.generate(_workload()[0][:1], SamplingParams(max_tokens=2), use_tqdm=False)
        assert wait_until(lambda: not pid_alive(pid), timeout=30)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("llm", ["mp"], indirect=True, scope="module")  # the engine's wait, not the backend, is under test
def test_a_hung_replica_is_found_while_another_keeps_finishing_steps(llm):
    """Replica 0 keeps finishing steps the whole time; replica 1's oldest step ages past the step timeout and
    replica 1 fails then (a wait that restarted whenever any replica returned would never notice)."""
    engine = llm.engine
    assert wait_until(lambda: engine.step() == [] and engine.replica_states() == {0: "serving", 1: "serving"},
                      timeout=BOUND_S)
    failures = engine.replicas.replicas[1].events.failures
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine.add_request("victim", _workload()[0][0], params, replica=1)
    engine.step()
    engine.executor.collective_rpc(hang_in_step, ranks=[engine.executor.layout.rank(1, 0, 0)])
    hung_at, n, routed = time.monotonic(), 0, []
    while engine.replicas.replicas[1].events.failures == failures:
        if engine.replicas.replicas[0].core.scheduler.num_unfinished < 2:  # replica 0 is never idle
            engine.add_request(f"busy-{n}", _workload()[0][n % 8], params, replica=0)
            n += 1
        if time.monotonic() - hung_at > engine.replicas.suspect_after_s + 0.5 and len(routed) < 4:
            # Routed freely, though replica 1 has less work: its step has run too long, so replica 0 gets it.
            engine.add_request(f"routed-{len(routed)}", _workload()[0][len(routed) + 1], params)
            routed.append(engine.replicas.owner[f"routed-{len(routed)}"].index)
        engine.step()
        assert time.monotonic() - hung_at < 3 * STEP_TIMEOUT_S, "the hung replica was not found"
    assert time.monotonic() - hung_at >= STEP_TIMEOUT_S * 0.9 and n > 3
    assert routed == [0, 0, 0, 0], routed
    while engine.has_unfinished_requests():  # the victim finishes on replica 0
        engine.step()


def test_a_request_waits_for_a_replica_only_so_long(tiny_path):
    """The only replica is down and its rebuild waits out a long backoff: its requests end with an error after
    ``no_replica_timeout_s`` instead of waiting forever, and a request that may not move at all
    (``migration_limit=0``) ends at the failure."""
    for limit, timeout, reason in ((3, 1.0, "no replica could serve request .* for 1s"),
                                   (0, 60.0, r"moved 0 times after replica failures \(migration_limit=0\)")):
        llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="mp",
                  replica_restart_backoff_s=60, no_replica_timeout_s=timeout, migration_limit=limit)
        try:
            engine = llm.engine
            engine.add_request("r", _workload()[0][0], SamplingParams(max_tokens=200, ignore_eos=True))
            engine.step()
            os.kill(engine.executor.collective_rpc("memory_report")[0]["pid"], signal.SIGKILL)
            start, errors = time.monotonic(), []
            while not errors:
                errors = [o.error for o in engine.step() if o.error is not None]
                assert time.monotonic() - start < BOUND_S
            assert time.monotonic() - start < timeout + 10
            assert len(errors) == 1 and re.search(reason, errors[0]), errors
            assert engine.replica_states() == {0: "failed"} and not engine.has_unfinished_requests()
        finally:
            llm.shutdown()
