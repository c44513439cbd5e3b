"""Weight-only int8/int4 quantization and the int8 KV cache: error bounds of the definitions, every kernel against
the reference, GGUF Q4 blocks taken as they are, tensor parallelism composing with quantization, quantized
checkpoints round-tripping, and the KV cache holding twice the blocks of bf16 in the same memory."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from dist_infer.compression.quantize import quantize_checkpoint
from dist_infer.layers.kv_int8 import dequantize_rows, write_int8
from dist_infer.layers.quantization.kernels import QuantizedWeight, _candidates
from dist_infer.layers.quantization.math import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from dist_infer.model_loader.gguf_quantized import decode_q4

PROMPTS = [[5, 17, 3, 99], list(range(40, 71)), [150, 2, 2, 7, 64, 33, 12, 0, 1]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """Input dims that whole groups of 32 split over 2 ranks: o_proj 64 (32 a rank), down_proj 128 (64 a rank)."""
    config = tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=151, tie_word_embeddings=False)
    return save_tiny_model(config, tmp_path_factory.mktemp("quant_src"))


def _generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _run(path, **kwargs) -> list[list[int]]:
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, **kwargs) as llm:
        return _generate(llm)


def _weight_bytes(worker) -> int:
    return worker.runner.model.weight_bytes


def _weights(shape=(48, 200), seed=0) -> torch.Tensor:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    w[3] *= 100  # one row of outliers: per-row scales must keep the others precise
    w[5, :] = 0.0  # an all-zero row
    return w


def test_int8_error_is_at_most_half_a_step_per_row():
    w = _weights()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0],)
    assert int(q.abs().max()) <= 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)
    assert torch.allclose(scale, w.abs().amax(dim=1).clamp(min=1e-12) / 127)
    assert torch.equal(dequantize_int8(q, scale)[5], torch.zeros(w.shape[1]))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group_and_the_range_is_exact(group_size):
    w = _weights()  # 200 input features: the last group is short for every group size
    q, scale, zero = quantize_int4(w, group_size)
    groups = -(-w.shape[1] // group_size)
    assert q.shape == w.shape and int(q.max()) <= 15 and scale.shape == zero.shape == (w.shape[0], groups)
    restored = dequantize_int4(q, scale, zero, group_size)
    step = scale.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    assert torch.all((restored - w).abs() <= step / 2 + 1e-5)
    # the 16 levels span each group's [min, max] exactly (Q4_1's grid), the short last group's too
    for rows, start in ((slice(None), 0), (slice(None), (groups - 1) * group_size)):
        original, back = w[rows, start:start + group_size], restored[rows, start:start + group_size]
        assert torch.allclose(back.amin(1), original.amin(1), atol=1e-5)
        assert torch.allclose(back.amax(1), original.amax(1), atol=1e-5)
    # finer groups can only help: the error of group 32 is below that of one scale per row
    q_row, s_row, z_row = quantize_int4(w, w.shape[1])
    assert (restored - w).norm() <= (dequantize_int4(q_row, s_row, z_row, w.shape[1]) - w).norm() + 1e-6


@pytest.mark.parametrize("method,group_size", [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_matches_the_reference_matmul(method, group_size, dtype):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    parts = quantize_int8(w) + (None,) if method == "int8" else quantize_int4(w, group_size)
    weight = QuantizedWeight(method, *parts, group_size)
    exact = weight.dequantize(torch.float32)
    candidates = _candidates(weight, dtype, torch.device("cpu"))
    assert "dequant" in candidates and len(candidates) >= 2, f"no fused kernel was available: {sorted(candidates)}"
    for rows in (1, 5, 32):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        reference = x @ exact.T
        for name, (kernel, _) in candidates.items():
            got = kernel(x.to(dtype)).float()
            # the native kernels quantize the activations to int8 (see quantization/native.py)
            half = dtype != torch.float32 or name.endswith("@bf16") or name == "native"
            tolerance = (2e-2 if half else 1e-4) * reference.abs().max()
            assert (got - reference).abs().max() <= tolerance, f"{name} at {rows} rows"


def test_kv_int8_codes_rescale_as_a_block_fills():
    block_size, heads, dim = 4, 2, 8
    cache = torch.zeros(3, block_size, heads, dim, dtype=torch.int8)
    scales = torch.zeros(3, heads)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(2, heads, dim, generator=g)
    second = torch.randn(2, heads, dim, generator=g) * 10  # larger: the block's scale must grow
    for slots, x in ((torch.tensor([4, 5]), first), (torch.tensor([6, 7]), second)):
        write_int8(cache, scales, slots, x, *torch.unique(slots // block_size, return_inverse=True))
    values = dequantize_rows(cache[None, 1:2], scales[None, 1:2], torch.float32)[0, 0]  # [bs, Hk, D]
    expected = torch.cat([first, second])
    assert torch.allclose(scales[1], torch.cat([first, second]).abs().amax(dim=(0, 2)) / 127)
    # the earlier codes were rounded twice: at most half a step of the old scale and half of the new
    assert torch.all((values - expected).abs() <= scales[1][None, :, None] + 1e-6)
    assert torch.all(cache[[0, 2]] == 0) and torch.all(scales[[0, 2]] == 0)  # other blocks untouched


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_load_as_int4_equal_to_ggufs_own_dequantization(kind):
    import gguf
    from gguf.quants import dequantize, quantize

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2)).numpy()
    w[4, :32] = 0.25  # a constant block (zero range)
    raw = quantize(w, qtype)
    q, scale, zero = decode_q4(raw, kind, 16, 128)
    expected = torch.from_numpy(np.asarray(dequantize(raw, qtype), dtype=np.float32))
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (16, 4)
    assert torch.allclose(dequantize_int4(q, scale, zero, 32), expected, atol=1e-6, rtol=1e-5)


def test_embedded_gguf_loads_its_q4_blocks_straight_into_int4(default_model_path, monkeypatch):
    """The default model through its GGUF's Q4_1 blocks equals it through the fp32 conversion, and is smaller.
    The reference kernel is forced so that the comparison is about the weights (the kernels are tested above)."""
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "dequant")
    prompts = ["The capital of France is", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    with LLM(quantization="int4", quantization_group_size=32, max_model_len=256, kv_cache_memory=1 << 26) as llm:
        direct = llm.generate(prompts, params, use_tqdm=False)
        direct_bytes = llm.engine.executor.collective_rpc(_weight_bytes)[0]
    with LLM(model=default_model_path, dtype="float32", max_model_len=256, kv_cache_memory=1 << 26) as llm:
        full = llm.generate(prompts, params, use_tqdm=False)
        full_bytes = llm.engine.executor.collective_rpc(_weight_bytes)[0]
    assert [o.outputs[0].token_ids for o in direct] == [o.outputs[0].token_ids for o in full]
    # the reference kernel holds one code a byte (the fused ones pack two) beside the fp32 embeddings
    assert direct_bytes < 0.6 * full_bytes


@pytest.mark.parametrize("method,extra", [("int8", {}), ("int4", {"quantization_group_size": 32})])
def test_tensor_parallel_gives_the_same_tokens_as_one_rank(tiny_path, method, extra, monkeypatch):
    """With the fused kernel pinned (the measured choice may differ between shard shapes): each rank quantizes its
    own shard -- row-parallel int8 shards agreeing on the whole row's scale -- and the tokens do not change."""
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", f"{method}pack")
    single = _run(tiny_path, quantization=method, **extra)
    double = _run(tiny_path, quantization=method, tensor_parallel_size=2, distributed_executor_backend="mp", **extra)
    assert double == single


def test_row_parallel_groups_must_fall_inside_a_rank(tiny_path):
    with pytest.raises(ValueError, match=r"int4 groups of 64 input features do not fit o_proj.*each rank holds 32"):
        LLM(model=tiny_path, skip_tokenizer_init=True, quantization="int4", quantization_group_size=64,
            tensor_parallel_size=2, distributed_executor_backend="mp")
    with pytest.raises(ValueError, match="quantization_group_size=48 is not one of"):
        LLM(model=tiny_path, skip_tokenizer_init=True, quantization="int4", quantization_group_size=48)


@pytest.mark.parametrize("method,group_size", [("int8", 64), ("int4", 32)])
def test_quantized_checkpoint_round_trips(tiny_path, tmp_path, method, group_size, monkeypatch):
    """Saved q/scale/zero load as they are (tp=1 and, sliced by the same loaders, tp=2) and give the tokens of
    quantizing at load time (the fused kernel pinned: the measured choice may differ between shard shapes)."""
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", f"{method}pack")
    dest = str(tmp_path / "quantized")
    summary = quantize_checkpoint(tiny_path, dest, method, group_size, show_progress=False)
    assert summary["linears_quantized"] == 2 * 7
    with open(os.path.join(dest, "config.json")) as f:
        assert json.load(f)["quantization_config"]["method"] == method
    at_load = _run(tiny_path, quantization=method, quantization_group_size=group_size)
    assert _run(dest) == at_load
    assert _run(dest, tensor_parallel_size=2, distributed_executor_backend="mp") == at_load
    with pytest.raises(ValueError, match="already quantized"):
        _run(dest, quantization="int4" if method == "int8" else "int8")


def test_kv_int8_holds_twice_the_blocks_of_bf16_and_keeps_greedy_tokens(tiny_path):
    budget = 1 << 21
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    blocks, outputs = {}, {}
    for dtype, kv_dtype in (("bfloat16", "auto"), ("bfloat16", "int8"), ("float32", "auto"), ("float32", "int8")):
        with LLM(model=tiny_path, dtype=dtype, skip_tokenizer_init=True, kv_cache_memory=budget,
                 kv_cache_dtype=kv_dtype, max_num_seqs=1024) as llm:
            blocks[dtype, kv_dtype] = llm.engine.cores[0].kv_cache_manager.num_blocks
            outputs[dtype, kv_dtype] = [o.outputs[0] for o in llm.generate(
                [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]
    # int8 codes are half of bf16 and a quarter of fp32; the per-block scales cost a little
    assert 1.9 <= blocks["bfloat16", "int8"] / blocks["bfloat16", "auto"] <= 2.0
    assert 3.8 <= blocks["float32", "int8"] / blocks["float32", "auto"] <= 4.0
    # With fp32 weights the only difference is the cache's rounding: greedy tokens agree, except where the
    # reference itself was torn between its top two (then int8 picks the runner-up, and the texts part).
    for reference, got in zip(outputs["float32", "auto"], outputs["float32", "int8"]):
        first = next((i for i, (a, b) in enumerate(zip(reference.token_ids, got.token_ids)) if a != b), None)
        if first is None:
            continue
        top = sorted(reference.logprobs[first].items(), key=lambda kv: -kv[1].logprob)[:2]
        assert got.token_ids[first] == top[1][0], f"diverged at {first} to a token outside the reference's top 2"
        assert top[0][1].logprob - top[1][1].logprob < 0.05, f"diverged at {first} without a near-tie"
    identical = sum(r.token_ids == g.token_ids for r, g in zip(outputs["float32", "auto"], outputs["float32", "int8"]))
    assert identical >= len(PROMPTS) - 1


@pytest.mark.parametrize("method,group_size", [("int8", 64), ("int4", 32), ("int4", 64)])
def test_gptq_beats_rounding_to_nearest_on_the_layer_output(method, group_size):
    """GPTQ minimises ||X W^T - X Q^T|| on calibration inputs X; on held-out inputs from the same correlated
    distribution its output error must be well below round-to-nearest's, in the same stored format."""
    from dist_infer.compression.gptq import gptq

    g = torch.Generator().manual_seed(3)
    mixing = torch.randn(128, 128, generator=g) / 128 ** 0.5 + torch.eye(128)
    scales = torch.logspace(-1, 1, 128)  # some inputs carry far more energy than others
    calib, held_out = [(torch.randn(n, 128, generator=g) @ mixing) * scales for n in (2048, 512)]
    w = torch.randn(48, 128, generator=g)
    result = gptq(w, calib.T @ calib / len(calib), method, group_size)
    if method == "int8":
        restored, rtn = dequantize_int8(result["q"], result["scale"]), dequantize_int8(*quantize_int8(w))
    else:
        assert result["q"].dtype == torch.uint8 and int(result["q"].max()) <= 15
        restored = dequantize_int4(result["q"], result["scale"], result["zero"], group_size)
        rtn = dequantize_int4(*quantize_int4(w, group_size), group_size)
    error, rtn_error = ((held_out @ (m - w).T).norm() for m in (restored, rtn))
    assert error < 0.8 * rtn_error


def test_gptq_checkpoint_runs_as_its_stored_codes_say(tiny_llama_with_tokenizer, tmp_path, monkeypatch):
    """The engine on a GPTQ checkpoint gives the tokens of transformers running the dequantized stored codes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dest = str(tmp_path / "gptq")
    summary = quantize_checkpoint(tiny_llama_with_tokenizer, dest, "int4", 32, show_progress=False,
                                  algorithm="gptq", calibration_texts=["Tensor parallelism splits each matrix."] * 4)
    assert summary["algorithm"] == "gptq" and summary["linears_quantized"] == 2 * 7
    stored = load_file(os.path.join(dest, "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            base = name[: -len(".weight")]
            if f"{base}.weight_q" in stored:
                param.copy_(dequantize_int4(stored[f"{base}.weight_q"], stored[f"{base}.weight_scale"],
                                            stored[f"{base}.weight_zero"], 32))
    prompts = [[5, 17, 3, 99], [1000, 2000, 3000]]
    reference = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                 for p in prompts]
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "dequant")  # fp32 throughout, as the reference
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(model=dest, kv_cache_memory=1 << 24) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    with pytest.raises(ValueError, match="unknown quantization algorithm 'awq'"):
        quantize_checkpoint(tiny_llama_with_tokenizer, str(tmp_path / "x"), "int4", algorithm="awq")
