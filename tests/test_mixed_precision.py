"""Mixed precision: bf16 and fp16 weights and activations, with norms, attention softmax and sampling in fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from dist_infer.layers.layernorm import RMSNorm

PROMPTS = [[5, 17, 3, 99], list(range(40, 71)), [150, 2, 2, 7, 64, 33, 12, 0, 1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_normalizes_in_fp32_like_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0)).mul(30).to(dtype)
    weight = torch.rand(64, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours, theirs = RMSNorm(64, eps=1e-5, params_dtype=dtype), LlamaRMSNorm(64, eps=1e-5).to(dtype)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    assert torch.equal(ours(x), theirs(x))
    residual = torch.randn(7, 64, dtype=dtype)
    normed, summed = ours(x, residual)
    assert torch.equal(summed, x + residual) and torch.equal(normed, theirs(x + residual))
    # the statistics really are fp32: squaring these activations in fp16 would overflow to inf
    assert torch.isfinite(ours(torch.full((1, 64), 300.0, dtype=dtype))).all()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    config = tiny_llama_config(hidden_size=64, intermediate_size=128, vocab_size=151, tie_word_embeddings=False)
    return save_tiny_model(config, tmp_path_factory.mktemp("mixed"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_picks_the_tokens_transformers_fp32_would(tiny_path, dtype):
    """Teacher-forced against transformers in fp32: every token the half-precision engine picks greedily is the
    reference's argmax, or within half-precision noise of it (a near-tie); nearly all are the argmax exactly."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    with LLM(model=tiny_path, dtype=dtype, skip_tokenizer_init=True, kv_cache_memory=1 << 22) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        weights = llm.engine.executor.collective_rpc(lambda w: {p.dtype for p in w.runner.model.parameters()})[0]
    assert weights == {getattr(torch, dtype)}
    hf = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    exact = total = 0
    for prompt, output in zip(PROMPTS, outputs):
        tokens = output.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
        gaps = logits.max(-1).values - chosen
        # every half-precision op rounds at eps relative; through the layers that adds up to a few eps of the
        # largest logit
        noise = 4 * torch.finfo(getattr(torch, dtype)).eps * logits.abs().amax(-1)
        assert torch.all(gaps <= noise), f"a token far from the fp32 argmax: gaps {gaps.tolist()}"
        exact, total = exact + int((gaps == 0).sum()), total + len(tokens)
    assert exact >= 0.9 * total
    # logprobs come from fp32 logits: a log-softmax in half precision would round them to ~3 significant digits
    values = [lp.logprob for o in outputs for step in o.outputs[0].logprobs for lp in step.values()]
    assert any(v != float(torch.tensor(v, dtype=getattr(torch, dtype))) for v in values)
