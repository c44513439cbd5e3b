"""Each model family keeps greedy parity with Hugging Face -- tokens equal, logprobs within 1e-4 -- in one
process, under tensor and pipeline parallelism (local processes) and under both at once (Ray).

The workload has requests arriving over several steps, a shared prefix (prefix caching on) and a batch budget
small enough that prompts are prefilled in chunks. Tiny configs keep tp=2 legal (even head counts) and a
sliding window shorter than the longest prompt, so sliding layers really slide.

``FAMILIES`` maps a name to a factory of (tiny config, engine overrides); other families join by adding an
entry.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

from conftest import no_special_tokens
from dist_infer import LLM
from parallel_helpers import assert_matches_reference, drive_outputs, hf_reference, save_with_reference

SMALL = dict(vocab_size=163, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, **no_special_tokens())
GEMMA = dict(SMALL, head_dim=8, query_pre_attn_scalar=12, sliding_window=12, tie_word_embeddings=True)


def _phi3():
    # LongRoPE; the context stays within original_max_position_embeddings, so the short factors apply.
    return Phi3Config(**SMALL, original_max_position_embeddings=128, tie_word_embeddings=False,
                      rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.5, 4.0],
                                    "long_factor": [2.0, 4.0, 9.0, 20.0]}), dict(max_model_len=128)


def _phi3_partial():
    # Phi-4-mini style: only half of each head rotates.
    return Phi3Config(**SMALL, partial_rotary_factor=0.5, tie_word_embeddings=True), {}


def _gemma2():
    # Caps low enough to bend these random models' scores and logits.
    return Gemma2Config(**GEMMA, attn_logit_softcapping=4.0, final_logit_softcapping=8.0,
                        layer_types=["sliding_attention", "full_attention"] * 2), {}


def _gemma3():
    # Global layers with a scaled RoPE of their own base, local layers with theirs.
    return Gemma3TextConfig(**GEMMA, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                  "sliding_attention"],
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                             "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 10000.0}}), {}


def _qwen3():
    # head_dim (16) is not hidden_size / num_attention_heads (8).
    return Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=False), {}


FAMILIES = {"phi3": _phi3, "phi3-partial": _phi3_partial, "gemma2": _gemma2, "gemma3": _gemma3, "qwen3": _qwen3}
# Partial rotary and Qwen3's per-head q/k norms add nothing to the parallel paths: one process covers them.
PARALLEL_FAMILIES = ["phi3", "gemma2", "gemma3"]
# Prefill chunks of at most 16 tokens: every prompt but the shortest is split.
CHUNKED = dict(max_num_batched_tokens=16, long_prefill_token_threshold=8, enable_prefix_caching=True,
               kv_cache_memory=1 << 22, skip_tokenizer_init=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (path, engine overrides, workload, HF reference)."""
    root, built = tmp_path_factory.mktemp("families"), {}
    for name, factory in FAMILIES.items():
        config, overrides = factory()
        path, _, items, reference = save_with_reference(config, root / name, norm_std=0.3)
        built[name] = path, overrides, items, reference
    return built



def _check(checkpoints, name, **layout):
    path, overrides, items, reference = checkpoints[name]
    with LLM(model=path, **CHUNKED, **overrides, **layout) as llm:
        assert_matches_reference(drive_outputs(llm, items, logprobs=0), reference)
        stats = llm.engine.get_stats()
        assert stats.prefix_cache_hits > 0 and stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("name", FAMILIES)
def test_single_process_matches_hf(checkpoints, name):
    _check(checkpoints, name)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("name", PARALLEL_FAMILIES)
def test_mp_matches_hf(checkpoints, name, layout):
    size = dict(tp2=dict(tensor_parallel_size=2), pp2=dict(pipeline_parallel_size=2))[layout]
    _check(checkpoints, name, distributed_executor_backend="mp", **size)


@pytest.mark.slow
@pytest.mark.parametrize("name", PARALLEL_FAMILIES)
def test_ray_tp2_pp2_matches_hf(checkpoints, ray_session, name):
    _check(checkpoints, name, distributed_executor_backend="ray", tensor_parallel_size=2, pipeline_parallel_size=2)


def test_phi3_long_context_takes_the_long_factors(checkpoints, tmp_path):
    """With a serving context past original_max_position_embeddings, prompts longer than it rotate with the
    long factors, as Hugging Face does for them."""
    path, _, _, _ = checkpoints["phi3"]
    g = torch.Generator().manual_seed(1)
    items = [(torch.randint(0, 163, (n,), generator=g).tolist(), 5, arrival) for n, arrival in ((140, 0), (131, 1))]
    reference = hf_reference(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), items)
    with LLM(model=path, **{**CHUNKED, "max_num_batched_tokens": 64}, max_model_len=256) as llm:
        assert_matches_reference(drive_outputs(llm, items, logprobs=0), reference)
