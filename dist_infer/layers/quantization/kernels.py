"""Matmul kernels for quantized weights, and picking the fastest one per weight shape by measuring it.

Every kernel computes ``x W~^T`` for the dequantized weight ``W~`` of ``quantization/math.py``:
* ``dequant``: dequantize to the activation dtype, then an ordinary matmul (the reference; always present);
* ``int8pack`` / ``int4pack``: PyTorch's fused weight-only kernels (``_weight_int8pack_mm``,
  ``_weight_int4pack_mm_for_cpu`` on the CPU, ``_weight_int4pack_mm`` on CUDA);
* ``...@bf16``: the same with the activations rounded to bf16 around the call -- on the CPU the fused kernels
  are vectorized for bf16 only, and weight-only formats are normally paired with 16-bit activations;
* ``native`` (CPU): the project's own kernels (``quantization/native.py``), int8 activations times the codes in
  integer SIMD instructions, with OpenMP across output rows.

A candidate is timed at a decode-sized and a prefill-sized batch and used for that regime only if its output
matches the reference; the choice is cached per (method, shape, dtype, device), so each shape is measured once.
``DIST_INFER_QUANT_KERNEL=dequant`` (or another name) forces one kernel; a fused kernel of the other method
(``int4pack`` for the int8 LM head, say) leaves that method's weights to the measurement.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from dist_infer.layers.quantization.math import dequantize_int4, dequantize_int8
from dist_infer.layers.quantization.native import native_int4, native_int8

SMALL_BATCH = 8  # up to this many rows counts as decode-sized
_PROBE_ROWS = (1, 32)
_CHOICES: dict[tuple, tuple[str, str]] = {}


@dataclass
class QuantizedWeight:
    """What a quantized layer keeps after loading, and the kernels it runs."""

    method: str
    q: torch.Tensor  # int8 [N, K] or uint8 [N, K] (values 0..15)
    scale: torch.Tensor  # fp32 [N] (int8) or [N, G] (int4)
    zero: torch.Tensor | None  # fp32 [N, G] (int4)
    group_size: int
    small: Callable | None = None  # kernel for decode-sized batches
    large: Callable | None = None  # kernel for larger ones
    kernel_names: tuple[str, str] = ("dequant", "dequant")
    keep: list = field(default_factory=list)  # tensors the chosen kernels hold

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.method == "int8":
            return dequantize_int8(self.q, self.scale, dtype)
        return dequantize_int4(self.q, self.scale, self.zero, self.group_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return (self.small if rows <= SMALL_BATCH else self.large)(x)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keep)


def _candidates(w: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[Callable, list]]:
    """name -> (kernel, tensors it needs)."""
    out: dict[str, tuple[Callable, list]] = {}
    tensors = [w.q, w.scale] + ([w.zero] if w.zero is not None else [])
    out["dequant"] = (lambda x: F.linear(x, w.dequantize(x.dtype)), tensors)
    act_dtypes = [dtype] + ([torch.bfloat16] if dtype == torch.float32 else [])
    for act in act_dtypes:
        suffix = "" if act == dtype else "@bf16"
        try:
            if w.method == "int8":
                kernel, held = _int8pack(w, act, dtype)
            else:
                kernel, held = _int4pack(w, act, dtype, device)
        except (RuntimeError, NotImplementedError, AttributeError):
            continue  # this build or device has no such kernel
        out[f"{w.method}pack{suffix}"] = (kernel, held)
    if device.type == "cpu":
        native = (native_int8(w.q, w.scale, dtype) if w.method == "int8"
                  else native_int4(w.q, w.scale, w.zero, w.group_size, dtype))
        if native is not None:
            out["native"] = native
    return out


def _int8pack(w: QuantizedWeight, act: torch.dtype, out_dtype: torch.dtype):
    q, scale = w.q, w.scale.to(act)

    def kernel(x):
        return torch.ops.aten._weight_int8pack_mm(x.to(act), q, scale).to(out_dtype)

    return kernel, [q, scale]


def _int4pack(w: QuantizedWeight, act: torch.dtype, out_dtype: torch.dtype, device: torch.device):
    n, k = w.q.shape
    g = w.group_size
    padded = -(-k // g) * g
    q = w.q.to(torch.int32)
    if padded != k:  # the last group is short: pad it; padded inputs are zero, so the codes do not matter
        q = F.pad(q, (0, padded - k))
    # The fused kernels use w = (q - 8) * s + m, so m = (8 - z) * s; layout [groups, N, 2].
    scales_and_zeros = torch.stack([w.scale, (8 - w.zero) * w.scale], dim=-1).transpose(0, 1).contiguous().to(act)
    if device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(q.to(torch.uint8)[:, ::2] << 4 | q.to(torch.uint8)[:, 1::2], 8)
        op = torch.ops.aten._weight_int4pack_mm
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        op = torch.ops.aten._weight_int4pack_mm_for_cpu

    def kernel(x):
        x = x.to(act)
        if padded != k:
            x = F.pad(x, (0, padded - k))
        return op(x.reshape(-1, padded), packed, g, scales_and_zeros).view(*x.shape[:-1], n).to(out_dtype)

    return kernel, [packed, scales_and_zeros]


def _time(kernel: Callable, x: torch.Tensor, repeats: int = 5) -> float:
    for _ in range(2):
        kernel(x)
    start = time.perf_counter()
    for _ in range(repeats):
        kernel(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def choose_kernels(w: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> None:
    """Measures the candidates and installs the fastest correct one for each batch regime."""
    candidates = _candidates(w, dtype, device)
    forced = os.environ.get("DIST_INFER_QUANT_KERNEL")
    key = (w.method, w.group_size, tuple(w.q.shape), dtype, device.type, forced)
    if key not in _CHOICES:
        other = {"int8": "int4pack", "int4": "int8pack"}[w.method]
        if forced and not forced.startswith(other):
            if forced not in candidates:
                raise ValueError(f"DIST_INFER_QUANT_KERNEL={forced!r} is not available here; have {sorted(candidates)}")
            _CHOICES[key] = (forced, forced)
        else:
            _CHOICES[key] = tuple(_fastest(candidates, w, rows, dtype, device) for rows in _PROBE_ROWS)
    small, large = _CHOICES[key]
    w.small, w.large = candidates[small][0], candidates[large][0]
    w.kernel_names = (small, large)
    held = {id(t): t for name in (small, large) for t in candidates[name][1]}
    w.keep = list(held.values())
    if "dequant" not in w.kernel_names:  # the fused kernels hold their own packed copies
        w.q = w.scale = w.zero = None


def _fastest(candidates: dict, w: QuantizedWeight, rows: int, dtype: torch.dtype, device: torch.device) -> str:
    x = torch.randn(rows, w.q.shape[1], dtype=dtype, device=device)
    reference = candidates["dequant"][0](x).float()
    tolerance = 5e-2 * reference.abs().max().item() + 1e-3  # bf16 activations round at about 1e-2 relative
    timings = {}
    for name, (kernel, _) in candidates.items():
        try:
            if (kernel(x).float() - reference).abs().max().item() > tolerance:
                continue  # a kernel that disagrees with the definition is never used
            timings[name] = _time(kernel, x)
        except RuntimeError:
            continue
    return min(timings, key=timings.get)
