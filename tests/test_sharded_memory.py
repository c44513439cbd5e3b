"""Each worker holds its share of the model, and loading never costs a worker anything near the whole model."""

from __future__ import annotations

import os

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """~134 MB of fp32 weights: large enough that a worker's share stands well clear of noise."""
    config = tiny_llama_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False)
    return save_tiny_model(config, tmp_path_factory.mktemp("mid"))


@pytest.mark.slow
def test_tp2_pp2_workers_hold_a_quarter_each(mid_model):
    full = os.path.getsize(os.path.join(mid_model, "model.safetensors"))
    with LLM(model=mid_model, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="mp",
             tensor_parallel_size=2, pipeline_parallel_size=2) as llm:
        reports = llm.engine.executor.collective_rpc("memory_report")
    norms = 2 * 4 * 512 * 4 + 512 * 4  # replicated RMSNorm weights of a stage's 4 layers, plus the final norm
    for report in reports:
        share = report["parameter_bytes"]
        assert abs(share - full / 4) <= 0.01 * full / 4 + norms, report
        # Loading touches only this rank's slices: its private memory grows by about its share, not the model.
        assert report["load_peak_memory_increase"] < 0.5 * full, report
    assert sum(r["parameter_bytes"] for r in reports) == pytest.approx(full, rel=0.01)
