"""Greedy tokens and logits of dist-infer equal Hugging Face transformers' on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from conftest import no_special_tokens, save_tiny_model
from dist_infer import LLM, SamplingParams
from parallel_helpers import hf_greedy_with_logprobs

NEW_TOKENS = 32

CONFIGS = {
    "llama-gqa-untied": (LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     tie_word_embeddings=False, initializer_range=0.3, **no_special_tokens()), 0.0),
    "llama-mha-tied-odd": (LlamaConfig(vocab_size=263, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                       num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=256,
                                       tie_word_embeddings=True, initializer_range=0.3, **no_special_tokens()), 0.0),
    "llama-mqa-bias": (LlamaConfig(vocab_size=199, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=1, max_position_embeddings=256,
                                   attention_bias=True, mlp_bias=True, initializer_range=0.3,
                                   **no_special_tokens()), 0.3),
    "llama3-rope-scaling": (LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64},
                                        initializer_range=0.3, **no_special_tokens()), 0.0),
    "mistral-sliding-window": (MistralConfig(vocab_size=311, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                             max_position_embeddings=256, sliding_window=24, initializer_range=0.3,
                                             **no_special_tokens()), 0.0),
    "qwen2-qkv-bias-tied": (Qwen2Config(vocab_size=257, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True, initializer_range=0.3, **no_special_tokens()), 0.3),
}

PROMPT_LENGTHS = (1, 5, 23, 61)


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    config, bias_std = CONFIGS[request.param]
    path = save_tiny_model(config, tmp_path_factory.mktemp(request.param), bias_std=bias_std)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, config


def test_greedy_tokens_and_logprobs_match_hf(checkpoint):
    path, hf, config = checkpoint
    prompts = _prompts(config.vocab_size)
    llm = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 24)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=config.vocab_size)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy_with_logprobs(hf, prompt, NEW_TOKENS)
        completion = output.outputs[0]
        assert completion.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged from transformers"
        assert completion.finish_reason == "length"
        ours = torch.tensor([[step[t].logprob for t in range(config.vocab_size)] for step in completion.logprobs])
        torch.testing.assert_close(ours, ref_logprobs, atol=1e-4, rtol=0)


def test_last_position_logits_match_hf(checkpoint):
    from dist_infer.config import ModelConfig
    from dist_infer.model_loader.model_factory import build_model
    from model_forward import forward_logits

    path, hf, config = checkpoint
    model = build_model(ModelConfig(path, skip_tokenizer_init=True), torch.device("cpu"))
    for prompt in _prompts(config.vocab_size, seed=7):
        ours = forward_logits(model, prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].float()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_matches_hf(default_model_path):
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    llm = LLM(kv_cache_memory=1 << 27, max_model_len=2048)
    tok = llm.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, in a small village at the edge of a great forest, there lived"]
    prompts = [tok.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy_with_logprobs(hf, prompt, NEW_TOKENS)
        completion = output.outputs[0]
        assert completion.token_ids == ref_tokens
        for step, (entry, ref) in enumerate(zip(completion.logprobs, ref_logprobs)):
            for token, lp in entry.items():
                assert abs(lp.logprob - ref[token].item()) < 1e-4, f"step {step} token {token}"
    # Last-position logits of the prompts themselves, from the model the engine loaded.
    from model_forward import forward_logits

    model = llm.engine.executor.executor_of(0).worker.runner.model
    for prompt in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].float()
        torch.testing.assert_close(forward_logits(model, prompt), ref, atol=1e-4, rtol=0)
