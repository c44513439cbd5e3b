"""The native quantized matmuls (``layers/native/quant_matmul.c``) and the int8 embedding / LM head.

Each kernel is checked twice: exactly (to float rounding) against its own definition written out in float64
here -- activations quantized per block of 32, integer dots, fp16 d and m -- and within a stated tolerance against
the reference matmul with the dequantized weight, at 1, 3, 8 and 32 rows, odd sizes, fp32 and bf16 activations.
"""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from dist_infer.layers.native_kernels import native_compiler, native_compiler_available
from dist_infer.layers.quantization.kernels import QuantizedWeight, choose_kernels
from dist_infer.layers.quantization.math import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from dist_infer.layers.quantization.native import native_int4, native_int8

ROWS = (1, 3, 8, 32)


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    if not native_compiler_available():
        pytest.skip(f"no C compiler ({native_compiler()}) on this machine")
    monkeypatch.delenv("DIST_INFER_NATIVE_KERNELS", raising=False)


def _quantize_activations(x: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation codes: per block of 32 features a = round(x * 127 / max|x|), dx = max|x| / 127."""
    x = torch.nn.functional.pad(x.float(), (0, padded - x.shape[1])).view(x.shape[0], -1, 32)
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    return torch.round(x * inv).double(), (amax / 127.0).double()


def _int4_definition(x, q, scale, zero, g):
    """y = sum_j [d_j sum_{b in j} dx_b (a . q)_b + m_j sum_{k in j} x_k], d = fp16(s), m = fp16(-z s)."""
    n, k = q.shape
    padded = scale.shape[1] * g
    a, dx = _quantize_activations(x, padded)
    codes = torch.nn.functional.pad(q, (0, padded - k)).double().view(n, -1, 32)
    dots = torch.einsum("mbi,nbi->mnb", a, codes) * dx[:, None, :, 0]  # [M, N, blocks]
    d = scale.half().double()
    m = (-zero * scale).half().double()
    per_group = dots.view(x.shape[0], n, -1, g // 32).sum(-1)  # [M, N, G]
    sums = torch.nn.functional.pad(x.double(), (0, padded - k)).view(x.shape[0], -1, g).sum(-1)  # [M, G]
    return (per_group * d[None] + m[None] * sums[:, None, :]).sum(-1)


def _int8_definition(x, q, scale):
    n, k = q.shape
    padded = -(-k // 32) * 32
    a, dx = _quantize_activations(x, padded)
    codes = torch.nn.functional.pad(q, (0, padded - k)).double().view(n, -1, 32)
    return (torch.einsum("mbi,nbi->mnb", a, codes) * dx[:, None, :, 0]).sum(-1) * scale.double()[None]


def _rounding_bound(x, w, d=None, m=None, g=32):
    """The stated tolerance against the reference x W~^T, per output: each activation moves by at most half its
    block's step dx_b, so |error_mn| <= sum_b dx_b / 2 * sum_{k in b} |W~_nk|; for int4 the fp16 d and m (relative
    error <= 2^-11) add 2^-11 * sum_k |x_k| (|W~_nk| + 2 |m_n,k/g|); and float summation 1e-5 of the output."""
    n, k = w.shape
    padded = -(-k // g) * g
    _, dx = _quantize_activations(x, padded)
    w_abs = torch.nn.functional.pad(w.abs().double(), (0, padded - k)).view(n, -1, 32).sum(-1)  # [N, blocks]
    bound = (dx[:, :, 0] / 2) @ w_abs.T
    if m is not None:
        m_full = m.abs().double().repeat_interleave(g, dim=1)[:, :k]
        bound += 2.0 ** -11 * x.abs().double() @ (w.abs().double() + 2 * m_full).T
    return bound + 1e-5 * (x.double() @ w.double().T).abs().max()


SHAPES = [(96, 256), (67, 100), (200, 576), (33, 300)]  # (N, K): odd N, K not a multiple of 32 or of the group


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_equals_its_definition_and_the_reference(n, k, group_size, dtype):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    w[1] *= 50  # an outlier row
    q, scale, zero = quantize_int4(w, group_size)
    kernel, _ = native_int4(q, scale, zero, group_size, dtype)
    exact = dequantize_int4(q, scale, zero, group_size)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = kernel(x)
        assert got.dtype == dtype and got.shape == (rows, n)
        definition = _int4_definition(x.float(), q, scale, zero, group_size)
        assert (got.double() - definition).abs().max() <= 1e-5 * definition.abs().max() + (
            0 if dtype == torch.float32 else 1e-2 * definition.abs().max()), f"definition at {rows} rows"
        reference = x.double() @ exact.double().T
        bound = _rounding_bound(x.float(), exact, scale, -zero * scale, group_size)
        # bf16 outputs round once more: half a bf16 step of each output
        bound = bound + (reference.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0)
        assert torch.all((got.double() - reference).abs() <= bound), f"{rows} rows"


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_its_definition_and_the_reference(n, k, dtype):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k))
    w[2] *= 50
    q, scale = quantize_int8(w)
    kernel, _ = native_int8(q, scale, dtype)
    exact = dequantize_int8(q, scale)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 7)).to(dtype)
        got = kernel(x)
        definition = _int8_definition(x.float(), q, scale)
        assert (got.double() - definition).abs().max() <= 1e-5 * definition.abs().max() + (
            0 if dtype == torch.float32 else 1e-2 * definition.abs().max()), f"definition at {rows} rows"
        reference = x.double() @ exact.double().T
        bound = _rounding_bound(x.float(), exact)
        bound = bound + (reference.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0)
        assert torch.all((got.double() - reference).abs() <= bound), f"{rows} rows"


def test_zero_rows_and_a_zero_input_block():
    """An all-zero weight row and an all-zero block of x (max|x| = 0) give exact zeros, not NaN."""
    w = torch.randn(40, 96)
    w[3] = 0.0
    q, scale, zero = quantize_int4(w, 32)
    kernel, _ = native_int4(q, scale, zero, 32, torch.float32)
    x = torch.randn(2, 96)
    x[:, 32:64] = 0.0
    x[1] = 0.0
    y = kernel(x)
    assert torch.isfinite(y).all() and torch.equal(y[1], torch.zeros(40)) and y[0, 3] == 0.0


def test_the_choice_can_be_forced_to_native(monkeypatch):
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "native")
    w = torch.randn(64, 128)
    weight = QuantizedWeight("int4", *quantize_int4(w, 32), 32)
    choose_kernels(weight, torch.float32, torch.device("cpu"))
    assert weight.kernel_names == ("native", "native")
    assert weight.q is None  # the packed copy is all that stays: 4 bits a weight plus fp16 d and m per group
    assert weight.nbytes() == 64 * 128 // 2 + 64 * 4 * 4


# ---- the int8 embedding table and LM head --------------------------------------------------------------------

PROMPTS = [[5, 17, 3, 99], list(range(40, 71))]


@pytest.fixture(scope="module")
def tied_path(tmp_path_factory):
    config = tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=301, tie_word_embeddings=True)
    return save_tiny_model(config, tmp_path_factory.mktemp("tied"))


def _engine(path, **kwargs) -> LLM:
    return LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, **kwargs)


def _model(llm: LLM):
    return llm.engine.executor.executor_of(0).worker.runner.model


def test_quantized_table_is_shared_by_the_tied_embedding_and_head(tied_path, monkeypatch):
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "native")  # the same layer kernels (and bytes) in both runs
    with _engine(tied_path, quantization="int8", quantize_lm_head=False) as full:
        full_model = _model(full)
        table = full_model.model.embed_tokens.weight.detach().clone()
        # the fp32 table, and the head's repacked copy of it where oneDNN repacked it
        fp32_bytes = table.numel() * 4 * (2 if getattr(full_model.lm_head, "packed_weight", None) is not None else 1)
        full_bytes = full_model.weight_bytes
    with _engine(tied_path, quantization="int8") as small:
        model = _model(small)
        embedding, head = model.model.embed_tokens, model.lm_head
        assert embedding.weight.numel() == 0  # the fp32 table is gone
        codes, scales = embedding.table.keep
        assert head.quantized is not None and head.quantized.keep[0].data_ptr() == codes.data_ptr()
        ids = torch.tensor([0, 7, 300, 7])
        assert torch.allclose(embedding(ids), dequantize_int8(*quantize_int8(table))[ids])
        # the int8 table (codes and row scales) counts once, in place of the fp32 bytes
        assert model.weight_bytes == full_bytes - fp32_bytes + table.numel() + table.shape[0] * 4


def test_quantized_head_gives_the_logits_of_the_dequantized_table(tied_path):
    """Whichever kernel the head measured fastest: its logits are h times the dequantized int8 table, within the
    activations' rounding bound (``_rounding_bound``; exactly, for the reference kernel)."""
    with _engine(tied_path, quantization="int8") as llm:
        head = _model(llm).lm_head
        codes, scales = _model(llm).model.embed_tokens.table.keep
        table = dequantize_int8(codes, scales)
        hidden = torch.randn(5, table.shape[1], generator=torch.Generator().manual_seed(3))
        logits = head(hidden)
    assert logits.shape == (5, 301)
    reference = hidden.double() @ table.double().T
    assert torch.all((logits.double() - reference).abs() <= _rounding_bound(hidden, table)), head.quantized.kernel_names


def test_quantize_lm_head_needs_quantization(tied_path):
    with pytest.raises(ValueError, match="quantize_lm_head=True needs weight quantization"):
        _engine(tied_path, quantize_lm_head=True)
    with pytest.raises(ValueError, match="quantize_lm_head must be"):
        _engine(tied_path, quantization="int8", quantize_lm_head="yes")


# int8 activations make a model's outputs jump wherever a float difference of one ulp (another summation order:
# the tensor-parallel sum, a fused op) moves an activation across a rounding boundary: one code step moves the
# matmul's output by dx * |w|, and the steps compound over the layers. Between layouts the logprobs of this
# model differ by up to about 0.05 (measured); a wrong shard or a lost bias moves them by whole units.
LAYOUT_TOL = 0.15


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_native_kernels_under_tp_and_pp_agree_with_one_rank(tied_path, layout, monkeypatch):
    """The native kernels pinned (the measured choice may differ between shard shapes), int4 layers and the int8
    table split over ranks. Greedy decoding there (the fused native decoder layer included) picks, at every
    step, a token one rank also ranks first up to ``LAYOUT_TOL``, with the logprob one rank gives it (scoring
    the same sequence as a prompt) within ``LAYOUT_TOL``."""
    monkeypatch.setenv("DIST_INFER_QUANT_KERNEL", "native")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    kwargs = {"quantization": "int4", "quantization_group_size": 32}
    with _engine(tied_path, distributed_executor_backend="mp", **layout, **kwargs) as many:
        split = [o.outputs[0] for o in many.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                     use_tqdm=False)]
    with _engine(tied_path, **kwargs) as one:
        scored = one.generate([{"prompt_token_ids": p + list(o.token_ids)} for p, o in zip(PROMPTS, split)],
                              SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    for prompt, out, ref in zip(PROMPTS, split, scored):
        for j, (token, step) in enumerate(zip(out.token_ids, out.logprobs)):
            entry = ref.prompt_logprobs[len(prompt) + j]
            best = max(lp.logprob for lp in entry.values())
            assert abs(step[token].logprob - entry[token].logprob) <= LAYOUT_TOL, (j, step[token], entry)
            assert best - entry[token].logprob <= LAYOUT_TOL, f"step {j}: one rank ranks {token} far below its best"


# ---- the native add + RMSNorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 300])  # 300 x 576 rows: the threaded path
def test_native_add_rms_norm_equals_transformers(rows):
    """``RMSNorm`` in fp32 runs the native kernel; it equals transformers' LlamaRMSNorm after the residual add."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from dist_infer.layers.layernorm import RMSNorm

    ours, theirs = RMSNorm(576, eps=1e-5), LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(576))
        theirs.weight.copy_(ours.weight)
    x, residual = torch.randn(rows, 576) * 3, torch.randn(rows, 576)
    alone = ours(x)
    assert ours._native is not None, "the native kernel did not build"
    normed, stream = ours(x, residual)
    assert torch.equal(stream, x + residual)
    torch.testing.assert_close(normed, theirs(x + residual), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, theirs(x), rtol=1e-5, atol=1e-5)
    # a strided input takes the PyTorch path and gives the same
    torch.testing.assert_close(ours(x.t().contiguous().t()), alone, rtol=1e-5, atol=1e-5)
