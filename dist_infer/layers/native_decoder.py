"""A decoder layer's decode step as two native calls (``native/decoder_layer.c``).

At batch 1 a quantized layer's matmuls take about 0.2 ms on a small CPU, while the dozen PyTorch ops and
module calls around them (norms, RoPE, the cache writes, SiLU, the residual adds) cost several microseconds
each: the step's fixed cost, not its arithmetic, set the speed. For the steps where every token is a decode,
the attention half (add + RMSNorm, QKV, RoPE, cache write, attention, O) and the MLP half (add + RMSNorm,
gate/up, SiLU * up, down) each run as one call into C, built from the same kernels the module path uses (the
quantized matmuls, the paged decode attention, the RMSNorm), so the two paths differ only in the float rounding
of RoPE and SiLU. Between the halves the tensor-parallel sum runs in Python, as in ``RowParallelLinear``.

It applies to the plain pre-norm Llama layer (the caller checks the layer's classes) when the step is all
decodes, the activations are fp32 on the CPU, the KV cache is fp32, RoPE rotates whole heads, and the kernel
each projection chose for the step's batch size is ``native`` (``quantization/native.py``); otherwise the
module path runs. No forward hooks may be attached: the fused call would skip them.
``DIST_INFER_NATIVE_DECODER=0`` turns it off (the layers' own kernels still run natively).
"""

from __future__ import annotations

import ctypes
import os

import torch

from dist_infer.layers.forward_context import get_attention_metadata
from dist_infer.layers.native_kernels import decoder_layer_kernel
from dist_infer.layers.quantization.kernels import SMALL_BATCH
from dist_infer.layers.quantization.native import NativeMatmul

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("codes", _ptr), ("scales", _ptr), ("bias", _ptr), ("N", _i64), ("K", _i64),
                ("group", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", _ptr), ("ln2", _ptr), ("eps1", _f32), ("eps2", _f32), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("H", _i64), ("Hq", _i64), ("Hk", _i64), ("D", _i64),
                ("I", _i64), ("scale", _f32), ("window", _i64), ("k_cache", _ptr), ("v_cache", _ptr),
                ("block_size", _i64)]


class _Step(ctypes.Structure):
    _fields_ = [("T", _i64), ("cos", _ptr), ("sin", _ptr), ("slots", _ptr), ("tables", _ptr), ("W", _i64),
                ("lens", _ptr), ("nthreads", _i64)]


def _native_kernel(layer, rows: int) -> NativeMatmul | None:
    quantized = getattr(layer, "quantized", None)
    if quantized is None:
        return None
    kernel = quantized.small if rows <= SMALL_BATCH else quantized.large
    return kernel if isinstance(kernel, NativeMatmul) and kernel.out_dtype == torch.float32 else None


class NativeDecoderLayer:
    """``(cos_sin, hidden [T, H], residual [T, H] or None) -> (out, residual')`` for an all-decode step, or None
    where the native path does not apply (the caller then runs its modules)."""

    def __init__(self, attn, qkv_proj, o_proj, gate_up_proj, down_proj, input_norm, post_norm):
        self.lib = decoder_layer_kernel() if os.environ.get("DIST_INFER_NATIVE_DECODER", "1") != "0" else None
        self.attn, self.qkv, self.o, self.gate_up, self.down = attn, qkv_proj, o_proj, gate_up_proj, down_proj
        self.norms = (input_norm, post_norm)
        self.modules = (attn, qkv_proj, o_proj, gate_up_proj, down_proj, input_norm, post_norm)
        self._structs: dict[bool, tuple] = {}  # small batch? -> (kv cache it points into, struct, address)

    def __call__(self, cos_sin, hidden: torch.Tensor, residual: torch.Tensor | None):
        if self.lib is None or hidden.dtype != torch.float32 or hidden.dim() != 2 or not hidden.is_contiguous():
            return None
        if residual is not None and (residual.dtype != torch.float32 or not residual.is_contiguous()):
            return None
        T = hidden.shape[0]
        attn = self.attn
        if T == 0 or attn.kv_cache is None or attn.kv_scales is not None or attn.kv_cache.dtype != torch.float32:
            return None
        meta = get_attention_metadata(attn.kv_group)
        decodes = meta.decodes
        cos, sin = cos_sin
        if (decodes is None or decodes.count != T or cos.shape[-1] != attn.head_dim or not cos.is_contiguous()
                or self._hooked()):
            return None
        layer = self._layer(T <= SMALL_BATCH)
        if layer is None:
            return None
        step = self._step(meta, decodes, cos, sin, T)
        r_out, o, out = torch.empty_like(hidden), torch.empty_like(hidden), torch.empty_like(hidden)
        if self.lib.dist_infer_decoder_attn(layer, step, hidden.data_ptr(),
                                            None if residual is None else residual.data_ptr(),
                                            r_out.data_ptr(), o.data_ptr()):
            raise MemoryError("native decoder layer could not allocate its buffers")
        if self.o.tp_size > 1:
            o = self.o.reduce(o)
        # r_out is updated in place: each element of r'' = o + r' reads only its own element of r'
        if self.lib.dist_infer_decoder_mlp(layer, step, o.data_ptr(), r_out.data_ptr(), r_out.data_ptr(),
                                           out.data_ptr()):
            raise MemoryError("native decoder layer could not allocate its buffers")
        if self.down.tp_size > 1:
            out = self.down.reduce(out)
        return out, r_out

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    def _layer(self, small: bool):
        """The layer's struct (its address) for a batch regime, or None where a projection is not native there."""
        cached = self._structs.get(small)
        if cached is not None and cached[0] is self.attn.kv_cache:
            return cached[2]
        rows = 1 if small else SMALL_BATCH + 1
        kernels = [_native_kernel(p, rows) for p in (self.qkv, self.o, self.gate_up, self.down)]
        if None in kernels or any(n.weight.dtype != torch.float32 for n in self.norms):
            self._structs[small] = (self.attn.kv_cache, None, None)
            return None
        attn, cache = self.attn, self.attn.kv_cache
        # row-parallel biases count once, after the tensor-parallel sum (the caller adds them there)
        tp = self.o.tp_size > 1
        linears = [_linear(kernels[0], self.qkv.bias, self.qkv.input_size),
                   _linear(kernels[1], None if tp else self.o.bias, self.o.input_size_local),
                   _linear(kernels[2], self.gate_up.bias, self.gate_up.input_size),
                   _linear(kernels[3], None if tp else self.down.bias, self.down.input_size_local)]
        ln1, ln2 = self.norms
        struct = _Layer(ln1.weight.data_ptr(), ln2.weight.data_ptr(), ln1.eps, ln2.eps, *linears,
                        self.o.output_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                        self.down.input_size_local, attn.scale, attn.sliding_window or 0,
                        cache[0].data_ptr(), cache[1].data_ptr(), cache.shape[2])
        # the struct holds raw pointers: keep what they point into alive with it
        self._structs[small] = (cache, (struct, kernels), ctypes.addressof(struct))
        return self._structs[small][2]

    def _step(self, meta, decodes, cos, sin, T: int) -> int:
        """The step's struct (its address), built once per step and RoPE table, shared by the layers."""
        key = ("native_step", cos.data_ptr())
        cached = meta.native.get(key)
        if cached is None:
            tables, lens, slots = decodes.block_tables, decodes.seq_lens, meta.slot_mapping
            step = _Step(T, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1],
                         lens.data_ptr(), torch.get_num_threads())
            cached = meta.native[key] = (step, ctypes.addressof(step), (cos, sin))
        return cached[1]


def _linear(kernel: NativeMatmul, bias: torch.Tensor | None, k: int) -> _Linear:
    return _Linear(kernel.kind, kernel.codes.data_ptr(), kernel.scales.data_ptr(),
                   None if bias is None else bias.data_ptr(), kernel.n, k, kernel.group)
