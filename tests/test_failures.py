"""A worker that fails to load, raises in a step, or dies makes the coordinator raise a clear error naming
the rank, within a bounded time, and leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from dist_infer.executor.base import WorkerError
from parallel_helpers import arm_step_failure, pid_alive, wait_until

BOUND_S = 60  # far below the 300 s hang timeout: failures must be noticed, not timed out


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(num_hidden_layers=4), tmp_path_factory.mktemp("fail"))


@pytest.fixture(scope="module", params=["mp", "ray"])
def backend(request):
    if request.param == "ray":
        ray = pytest.importorskip("ray")
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
              tensor_parallel_size=2)
    pids = [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report")]
    llm.engine.executor.collective_rpc(arm_step_failure, (2,), ranks=[1])
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 \(dp 0, pp 0, tp 1\) failed in execute_model:.*injected"):
        llm.generate(_prompts(), SamplingParams(max_tokens=20), use_tqdm=False)
    assert time.monotonic() - start < BOUND_S
    llm.shutdown()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)


def test_killed_worker_is_reported(backend, tiny_path):
    llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend=backend,
              pipeline_parallel_size=2)
    pids = [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report")]
    engine = llm.engine
    for i, prompt in enumerate(_prompts()):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=30))
    engine.step()
    engine.step()
    os.kill(pids[1], signal.SIGKILL)  # the last stage dies mid-generation
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 \(dp 0, pp 1, tp 0\).*(exited|died)"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < BOUND_S
    llm.shutdown()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)
