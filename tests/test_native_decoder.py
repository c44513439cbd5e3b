"""The fused native decode step of a quantized Llama layer (``layers/native_decoder.py``, issue 17).

It strings together the kernels the module path runs (the native quantized matmuls, RMSNorm, SiLU * up and the
paged decode attention) and rotates q and k with PyTorch's rounding, so it must give the module path's results
bit for bit: tokens and logprobs equal, for int4 and int8, GQA/MQA, biases, a sliding window, block boundaries
crossed. It must also take every all-decode step it can and decline the steps it cannot (prefills, an int8 KV
cache, unquantized weights), and it must run under tensor and pipeline parallelism.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_model
from dist_infer import LLM, SamplingParams
from dist_infer.layers import native_decoder
from dist_infer.layers.native_kernels import silu_mul, silu_mul_kernel
from test_parity_hf import CONFIGS

MODELS = ["llama-gqa-untied", "llama-mqa-bias", "qwen2-qkv-bias-tied", "mistral-sliding-window"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for name in MODELS:
        config, bias_std = CONFIGS[name]
        paths[name] = (save_tiny_model(config, tmp_path_factory.mktemp(name), bias_std=bias_std), config)
    return paths


@pytest.fixture
def calls(monkeypatch):
    """Counts the native layer's calls: how many it took, how many it declined."""
    seen = {"took": 0, "declined": 0}
    original = native_decoder.NativeDecoderLayer.__call__

    def counted(self, *args):
        out = original(self, *args)
        seen["took" if out is not None else "declined"] += 1
        return out

    monkeypatch.setattr(native_decoder.NativeDecoderLayer, "__call__", counted)
    return seen


def _prompts(vocab: int, lengths=(5, 23, 9), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lengths]


def _run(path, prompts, max_tokens=24, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, block_size=4, **kwargs) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("name", MODELS)
def test_fused_decode_equals_the_module_path_bit_for_bit(checkpoints, name, method, calls, monkeypatch):
    """Greedy tokens and their top-3 logprobs, 24 decode steps of 3 sequences in 4-token blocks (the sliding
    window of 24 is passed by the 23-token prompt), native kernels pinned in both runs."""
    path, config = checkpoints[name]
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "native")
    prompts = _prompts(config.vocab_size)
    kwargs = {"quantization": method, "quantization_group_size": 32}
    fused = _run(path, prompts, **kwargs)
    layers = config.num_hidden_layers
    # every step after the prompts' is all decodes: 23 of them, each layer taking each
    assert calls["took"] == 23 * layers, calls
    monkeypatch.setenv("DIST_INFER_NATIVE_DECODER", "0")
    took = calls["took"]
    modules = _run(path, prompts, **kwargs)
    assert calls["took"] == took, "turned off, it must not run"
    assert fused == modules


def test_steps_it_cannot_take_run_the_modules(checkpoints, calls, monkeypatch):
    """Prefill and mixed steps, an int8 KV cache and unquantized weights are declined; the results stay right."""
    path, config = checkpoints["llama-gqa-untied"]
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "native")
    prompts = _prompts(config.vocab_size, lengths=(5, 40))
    # chunks of 8 tokens: the long prompt's chunks share steps with the short one's decodes
    mixed = _run(path, prompts, max_tokens=8, quantization="int8", max_num_batched_tokens=8)
    assert calls["took"] > 0 and calls["declined"] > 0
    monkeypatch.setenv("DIST_INFER_NATIVE_DECODER", "0")
    assert mixed == _run(path, prompts, max_tokens=8, quantization="int8", max_num_batched_tokens=8)
    monkeypatch.delenv("DIST_INFER_NATIVE_DECODER")
    took = calls["took"]
    _run(path, prompts, max_tokens=4, quantization="int8", kv_cache_dtype="int8")
    _run(path, prompts, max_tokens=4)
    assert calls["took"] == took, "an int8 cache or fp32 weights must take the module path"


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_fused_decode_under_tp_and_pp_equals_the_module_path(checkpoints, layout, monkeypatch):
    """mp workers, so the call counts are not visible here: the module path's tokens and logprobs are the
    check, with the O and down projections' bias added after the tensor-parallel sum (llama-mqa-bias)."""
    path, config = checkpoints["llama-mqa-bias"]
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "native")
    prompts = _prompts(config.vocab_size)
    kwargs = {"quantization": "int8", "distributed_executor_backend": "mp", **layout}
    fused = _run(path, prompts, max_tokens=12, **kwargs)
    monkeypatch.setenv("DIST_INFER_NATIVE_DECODER", "0")
    assert fused == _run(path, prompts, max_tokens=12, **kwargs)


@pytest.mark.parametrize("rows", [1, 3, 200])  # 200 x 384: the threaded path
def test_native_silu_mul_equals_pytorch(rows):
    lib = silu_mul_kernel()
    assert lib is not None, "the native kernel did not build"
    gu = torch.randn(rows, 2 * 384, generator=torch.Generator().manual_seed(rows)) * 4
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(lib, gu), F.silu(gate) * up, rtol=1e-6, atol=1e-6)
