"""A worker that fails to load, raises in a step, or dies makes the coordinator raise a clear error naming
the rank, within a bounded time, and leaves no process behind. (Here replicas are not rebuilt --
``max_replica_restarts=0`` -- so the failure ends the engine; ``test_replica_failover`` covers recovery.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, RequestFailedError, SamplingParams
from dist_infer.executor.base import WorkerError
from parallel_helpers import arm_step_failure, pid_alive, wait_until

BOUND_S = 60  # far below the 300 s hang timeout: failures must be noticed, not timed out


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(num_hidden_layers=4), tmp_path_factory.mktemp("fail"))


@pytest.fixture(scope="module", params=["mp", "ray"])
def backend(request):
    if request.param == "ray":
        import ray  # a required dependency: if it is broken the tests fail, they are not skipped
        import parallel_helpers

        ray.cloudpickle.register_pickle_by_value(parallel_helpers)  # Ray workers cannot import the tests
        from dist_infer.executor.ray_cluster import start_private

        start_private(num_cpus=8)
        yield "ray"
        ray.shutdown()
    else:
        yield "mp"


def _prompts():
    return [{"prompt_token_ids": list(range(2, 2 + n))} for n in (5, 17, 9)]


def test_load_failure_names_the_rank(backend, tiny_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"] = torch.zeros(5, 5)  # only stage 1 reads layer 3
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 \(dp 0, pp 1, tp 0\) failed in load:.*down_proj"):
        LLM(model=str(broken), skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend=backend,
            pipeline_parallel_size=2)
    assert time.monotonic() - start < BOUND_S


def test_exception_in_a_step_names_the_rank(backend, tiny_path):
    llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend=backend,
              tensor_parallel_size=2, max_replica_restarts=0)
    pids = [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report")]
    llm.engine.executor.collective_rpc(arm_step_failure, (2,), ranks=[1])
    start = time.monotonic()
    with pytest.raises(RequestFailedError,
                       match=r"worker rank 1 \(dp 0, pp 0, tp 1\) failed in execute_model:.*injected"):
        llm.generate(_prompts(), SamplingParams(max_tokens=20), use_tqdm=False)
    assert time.monotonic() - start < BOUND_S
    llm.shutdown()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)


def test_killed_worker_is_reported(backend, tiny_path):
    llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend=backend,
              pipeline_parallel_size=2, max_replica_restarts=0)
    pids = [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report")]
    engine = llm.engine
    for i, prompt in enumerate(_prompts()):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=30))
    engine.step()
    engine.step()
    os.kill(pids[1], signal.SIGKILL)  # the last stage dies mid-generation
    start = time.monotonic()
    errors = []
    with pytest.raises(RuntimeError, match=r"every replica has failed.*worker rank 1 \(dp 0, pp 1, tp 0\).*(exited|died)"):
        while engine.has_unfinished_requests():
            errors += [out.error for out in engine.step() if out.error is not None]
    assert len(errors) == 3 and all("worker rank 1 (dp 0, pp 1, tp 0)" in e for e in errors)
    assert time.monotonic() - start < BOUND_S
    llm.shutdown()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)


def test_mp_engine_built_in_a_thread_pool_outlives_the_pool(tiny_path):
    # PR_SET_PDEATHSIG fires when the thread that started a worker exits: before the fix the workers were
    # killed as soon as the pool's thread ended, and the next call found them dead.
    with ThreadPoolExecutor(max_workers=1) as pool:
        llm = pool.submit(LLM, model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22,
                          distributed_executor_backend="mp", tensor_parallel_size=2).result()
    try:
        out = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in out] == [6, 6, 6]
        pids = [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report")]
        assert all(pid_alive(p) for p in pids)
    finally:
        llm.shutdown()


_COORDINATOR = '''
import sys, threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def hang_in_step(worker, marker):
    """Inside a worker: its next step announces itself, then never returns (so the worker never reads the
    pipe's EOF and only the kernel can end it)."""
    def hang(scheduler_output):
        Path(f"{marker}.{worker.rank}").touch()
        threading.Event().wait()

    worker.execute_model = hang


if __name__ == "__main__":
    from dist_infer import LLM, RequestFailedError, SamplingParams

    model, marker = sys.argv[1], sys.argv[2]
    with ThreadPoolExecutor(max_workers=1) as pool:  # built on a thread that is gone before the kill
        llm = pool.submit(LLM, model=model, skip_tokenizer_init=True, kv_cache_memory=1 << 22,
                          distributed_executor_backend="mp", tensor_parallel_size=2).result()
    pids = [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report")]
    llm.engine.executor.collective_rpc(hang_in_step, (marker,))
    print(" ".join(map(str, pids)), flush=True)
    llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4), use_tqdm=False)
'''


def test_sigkilled_coordinator_leaves_no_worker_behind(tiny_path, tmp_path):
    script, marker = tmp_path / "coordinator.py", tmp_path / "in-step"
    script.write_text(_COORDINATOR)
    coordinator = subprocess.Popen([sys.executable, str(script), tiny_path, str(marker)], stdout=subprocess.PIPE,
                                   text=True, cwd=tmp_path)
    pids: list[int] = []
    try:
        timer = threading.Timer(BOUND_S * 2, coordinator.kill)  # a coordinator that never prints fails the test
        timer.start()
        line = coordinator.stdout.readline()
        timer.cancel()
        assert line.strip(), f"the coordinator exited early (code {coordinator.poll()})"
        pids = [int(p) for p in line.split()]
        # Both workers are inside a step that never ends: they will not notice the pipe closing.
        assert wait_until(lambda: all((tmp_path / f"in-step.{r}").exists() for r in range(2)), timeout=BOUND_S)
        coordinator.kill()
        coordinator.wait(timeout=BOUND_S)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30), "workers outlived the coordinator"
    finally:
        coordinator.kill()
        coordinator.wait(timeout=BOUND_S)
        for pid in pids:  # only if the test failed: leave nothing running
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
