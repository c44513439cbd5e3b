"""Continuous batching keeps parity with Hugging Face: requests arriving at different steps, very different
prompt lengths, chunked prefill, prefix caching on and off, and a cache so small that requests are preempted."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from conftest import no_special_tokens, save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from parallel_helpers import drive_items

MODELS = {
    "llama": (tiny_llama_config(num_hidden_layers=3, vocab_size=151, max_position_embeddings=256,
                                tie_word_embeddings=False), 0.0),
    "qwen2": (Qwen2Config(vocab_size=163, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
                          initializer_range=0.3, **no_special_tokens()), 0.3),
}


def _workload(vocab: int):
    """(prompt, max_tokens, arrival step): lengths from 1 to 170, three sharing a 40-token system prefix."""
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    system = rand(40)
    items = [(rand(1), 24, 0), (rand(170), 12, 0), (system + rand(5), 20, 0), (rand(9), 30, 2),
             (system + rand(17), 16, 3), (rand(64), 8, 5), (system + rand(2), 25, 9), (rand(33), 18, 14)]
    return items


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    config, bias_std = MODELS[request.param]
    path = save_tiny_model(config, tmp_path_factory.mktemp(request.param), bias_std=bias_std)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items = _workload(config.vocab_size)
    reference = [hf.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False)[0, len(p):].tolist()
                 for p, m, _ in items]
    return path, items, reference


SCENARIOS = {
    "default": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16, long_prefill_token_threshold=8),
    "no-prefix-caching-chunked": dict(max_num_batched_tokens=24, enable_prefix_caching=False),
    "preemption-tiny-cache": dict(num_gpu_blocks_override=30, block_size=8, max_model_len=240,
                                  max_num_batched_tokens=32),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_continuous_batching_matches_hf(model, scenario, monkeypatch):
    path, items, reference = model
    if scenario == "chunked-prefill":  # this one runs the PyTorch reference path of decode attention
        monkeypatch.setenv("DIST_INFER_NATIVE_KERNELS", "0")
    llm = LLM(model=path, skip_tokenizer_init=True, **{"kv_cache_memory": 1 << 22, **SCENARIOS[scenario]})
    assert drive_items(llm, items) == reference
    stats = llm.engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total  # nothing leaked
    if scenario == "preemption-tiny-cache":
        assert stats.num_preemptions > 0
    if SCENARIOS[scenario].get("enable_prefix_caching", True):
        assert stats.prefix_cache_hits > 0  # the shared system prefix was reused
    else:
        assert stats.prefix_cache_hits == 0


def test_seeded_sampling_survives_preemption(model):
    """A preempted request keeps its random stream: seeded samples equal those of a roomy run."""
    path, items, _ = model

    def run(**kwargs):
        llm = LLM(model=path, skip_tokenizer_init=True, **kwargs)
        prompts = [{"prompt_token_ids": p} for p, _, _ in items]
        params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=m) for i, (_, m, _) in enumerate(items)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs], llm.engine.get_stats().num_preemptions

    roomy, none = run(kv_cache_memory=1 << 22)
    tight, preemptions = run(num_gpu_blocks_override=30, block_size=8, max_model_len=240, max_num_batched_tokens=32)
    assert none == 0 and preemptions > 0
    assert tight == roomy
