"""Tensor, pipeline and data parallelism keep parity with Hugging Face, under local processes and Ray.

Requests arrive over several steps, prefix caching is on and three requests share a prefix.
"""

from __future__ import annotations

import os

import pytest

from dist_infer import LLM
from parallel_helpers import build, drive, pid_alive, vocab_of, wait_until

LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
    "tp2pp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    "dp2": dict(data_parallel_size=2),
}
CASES = [("llama-kv2", layout) for layout in LAYOUTS] + [
    ("llama-kv1", "tp2"), ("qwen2-bias", "tp2pp2"), ("llama-tied", "pp2")]
# Ray runs the same workers as mp; what is its own (placement, one world per replica, the payload sent by
# reference) shows in a tensor x pipeline layout and in replicas.
RAY_CASES = [("llama-kv2", "tp2pp2"), ("llama-kv2", "dp2"), ("qwen2-bias", "tp2pp2")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {name: build(name, root) for name in {m for m, _ in CASES}}



def _check(checkpoints, model, layout, backend):
    path, reference = checkpoints[model]
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend=backend,
             **LAYOUTS[layout]) as llm:
        assert drive(llm, vocab_of(model)) == reference
        stats = llm.engine.get_stats()
        assert stats.prefix_cache_hits > 0 and stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("model,layout", CASES)
def test_mp_matches_hf(checkpoints, model, layout):
    _check(checkpoints, model, layout, "mp")


@pytest.mark.parametrize("model,layout", RAY_CASES)
def test_ray_matches_hf(checkpoints, ray_session, model, layout):
    _check(checkpoints, model, layout, "ray")


def test_ray_leaves_no_actor_or_placement_group(checkpoints, ray_session):
    import ray

    path, _ = checkpoints["llama-kv2"]
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="ray",
             tensor_parallel_size=2) as llm:
        pids = [r["pid"] for r in llm.engine.executor.collective_rpc("memory_report")]
        groups = [pg.id.hex() for pg in llm.engine.executor.executor_of(0).placement_groups]
        assert len(set(pids)) == 2 and os.getpid() not in pids
    table = ray.util.placement_group_table()
    assert all(table[g]["state"] == "REMOVED" for g in groups)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)
