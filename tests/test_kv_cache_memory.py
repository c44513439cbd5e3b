"""The CPU KV cache's memory: the host's budget is split among the workers that share it, and the whole cache is
resident from the start (so an over-commit fails at start and memory reports are true)."""

from __future__ import annotations

import os

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from dist_infer.worker.memory import available_host_memory


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # 2 layers x 2 KV heads x head_dim 8, fp32: 4 KiB per 16-token block.
    return save_tiny_model(tiny_llama_config(max_position_embeddings=2048), tmp_path_factory.mktemp("kv_memory"))


def _budget_share(llm) -> list[float]:
    """Each worker's CPU KV budget as a share of the host's available memory (read around the call)."""
    before = available_host_memory()
    budgets = llm.engine.executor.collective_rpc("kv_cache_budget")
    after = available_host_memory()
    fraction = llm.engine.config.cache_config.cpu_kv_cache_fraction
    return [b / (fraction * (before + after) / 2) for b in budgets]


def test_workers_on_one_host_split_its_kv_budget(tiny_path):
    kwargs = dict(model=tiny_path, skip_tokenizer_init=True, max_model_len=256)
    with LLM(**kwargs) as llm:
        alone = _budget_share(llm)
    with LLM(tensor_parallel_size=2, distributed_executor_backend="mp", **kwargs) as llm:
        shared = _budget_share(llm)
        out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2
    # One worker takes cpu_kv_cache_fraction of the RAM; two on one host take half of it each (before the fix
    # each took the whole fraction, so W workers asked for W times it).
    assert alone[0] == pytest.approx(1.0, rel=0.1)
    assert shared == [pytest.approx(0.5, rel=0.1)] * 2


def _resident_fraction(tensor) -> float:
    """The fraction of ``tensor``'s memory pages present in RAM, read from ``/proc/self/pagemap`` (bit 63: present,
    bit 62: swapped): about this tensor alone, whatever else this process or a neighbour allocates or frees."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    first, last = start // page, (start + tensor.numel() * tensor.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype="<u8")
    return float((((entries >> np.uint64(63)) | (entries >> np.uint64(62))) & np.uint64(1)).mean())


def test_the_whole_kv_cache_is_resident_after_start(tiny_path):
    kv_bytes = 128 << 20
    with LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=kv_bytes, max_model_len=2048) as llm:
        report = llm.engine.executor.collective_rpc("memory_report")[0]
        assert report["kv_cache_bytes"] == kv_bytes  # the budget is a whole number of blocks, under the ceiling
        # Before the fix the cache was reserved lazily (pages touched on first use), so it cost almost nothing
        # until the load came; now it is zero-filled at start. The worker runs in this process (uni executor).
        caches = llm.engine.executor.executor_of(0).worker.runner.kv_store.caches
        assert sum(c.numel() * c.element_size() for c in caches) == kv_bytes
        resident = [_resident_fraction(c) for c in caches]
        assert min(resident) >= 0.99, f"resident fraction of each layer's KV cache: {resident}"
        out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
