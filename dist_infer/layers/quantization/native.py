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

from typing import Callable

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


def _call(lib_call, x: torch.Tensor, n: int, out_dtype: torch.dtype, *weights) -> torch.Tensor:
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.float().contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if lib_call(rows.data_ptr(), rows.shape[0], k, *weights, torch.get_num_threads(), y.data_ptr()):
        raise MemoryError("native quantized matmul could not allocate its activation buffers")
    y = y.view(*x.shape[:-1], n)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def native_int4(q, scale, zero, group_size: int, out_dtype: torch.dtype) -> tuple[Callable, list] | None:
    """(kernel, tensors it holds) for an int4 weight, or None without the native library."""
    lib = quant_matmul_kernels()
    if lib is None:
        return None
    codes, dm = pack_int4(q, scale, zero, group_size)
    n = codes.shape[0]
    fn = lib.dist_infer_q4_matmul

    def kernel(x):
        return _call(fn, x, n, out_dtype, codes.data_ptr(), dm.data_ptr(), n, group_size)

    return kernel, [codes, dm]


def native_int8(q, scale, out_dtype: torch.dtype) -> tuple[Callable, list] | None:
    """(kernel, tensors it holds) for an int8 weight, or None without the native library."""
    lib = quant_matmul_kernels()
    if lib is None:
        return None
    codes, scale = pack_int8(q), scale.float().contiguous()
    n = codes.shape[0]
    fn = lib.dist_infer_q8_matmul

    def kernel(x):
        return _call(fn, x, n, out_dtype, codes.data_ptr(), scale.data_ptr(), n)

    return kernel, [codes, scale]
