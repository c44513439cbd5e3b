"""The native CPU kernels for quantized weights (``layers/native/quant_matmul.c``): their weight layouts and calls.

Each kernel computes ``x W~^T`` with the activations quantized to int8 per block of 32 features on the fly
(x ~ dx * a, dx = max|x| / 127), and integer dot products of the codes with a:

* int4 (groups of g = 32, 64 or 128): ``w = q * d + m`` with d = s and m = -z * s of ``math.py``, stored as
  fp16 (GGUF Q4_1 stores them so too); codes packed two per byte, 16 bytes per 32 features, byte i holding
  features i (low nibble) and i + 16 (high nibble).
* int8: the codes as they are (padded to a multiple of 32 features) and the fp32 row scales.

Relative to the dequantized reference ``x W~^T`` the result differs by the activations' rounding (at most half
a step of dx per feature) and, for int4, the fp16 rounding of d and m: about 1e-2 of the output's scale, the
same order as bf16 activations (``kernels._fastest`` accepts 5e-2 of the largest output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_infer.layers.native_kernels import quant_matmul_kernels

QBLOCK = 32


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """q uint8 [N, K] (0..15), scale/zero fp32 [N, G] -> codes uint8 [N, Kp / 2], dm int16 [N, 2, G] (fp16 bits
    of each row's d = s, then its m = -z * s), Kp = G * group_size."""
    n, k = q.shape
    padded = scale.shape[1] * group_size
    q = F.pad(q, (0, padded - k)) if padded != k else q
    halves = q.reshape(n, padded // QBLOCK, 2, QBLOCK // 2)
    codes = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, padded // 2).contiguous()
    dm = torch.stack([scale, -zero * scale], dim=1).to(torch.float16).contiguous()
    return codes, dm.view(torch.int16)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] -> [N, Kp] with Kp = K rounded up to 32 (zero codes in the padding)."""
    k = q.shape[1]
    padded = -(-k // QBLOCK) * QBLOCK
    return (F.pad(q, (0, padded - k)) if padded != k else q).contiguous()


class NativeMatmul:
    """One weight's native kernel: ``kernel(x) = x W~^T``. The fused decoder layer (``layers/native_decoder.py``)
    reads its codes and scales directly: ``kind`` is 1 for int4 (``scales`` = dm, groups of ``group``), 2 for int8
    (``scales`` = the row scales)."""

    def __init__(self, fn, kind: int, codes: torch.Tensor, scales: torch.Tensor, group: int,
                 out_dtype: torch.dtype):
        self.fn, self.kind, self.codes, self.scales, self.group = fn, kind, codes, scales, group
        self.n = codes.shape[0]
        self.out_dtype = out_dtype
        self._weights = (codes.data_ptr(), scales.data_ptr(), self.n) + ((group,) if kind == 1 else ())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.reshape(-1, k)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        y = torch.empty(rows.shape[0], self.n, dtype=torch.float32)
        if self.fn(rows.data_ptr(), rows.shape[0], k, *self._weights, torch.get_num_threads(), y.data_ptr()):
            raise MemoryError("native quantized matmul could not allocate its activation buffers")
        y = y.view(*x.shape[:-1], self.n)
        return y if self.out_dtype == torch.float32 else y.to(self.out_dtype)


def native_int4(q, scale, zero, group_size: int, out_dtype: torch.dtype) -> tuple[NativeMatmul, list] | None:
    """(kernel, tensors it holds) for an int4 weight, or None without the native library."""
    lib = quant_matmul_kernels()
    if lib is None:
        return None
    codes, dm = pack_int4(q, scale, zero, group_size)
    return NativeMatmul(lib.dist_infer_q4_matmul, 1, codes, dm, group_size, out_dtype), [codes, dm]


def native_int8(q, scale, out_dtype: torch.dtype) -> tuple[NativeMatmul, list] | None:
    """(kernel, tensors it holds) for an int8 weight, or None without the native library."""
    lib = quant_matmul_kernels()
    if lib is None:
        return None
    codes, scale = pack_int8(q), scale.float().contiguous()
    return NativeMatmul(lib.dist_infer_q8_matmul, 2, codes, scale, 0, out_dtype), [codes, scale]
