"""Quantize and dequantize weights [out, in] (the reference definitions every kernel must reproduce).

int8, per output channel n:  ``s_n = max_k |W_nk| / 127``,  ``q = round(W / s_n)`` in [-127, 127],  ``W ~ q * s_n``.
int4, per output channel n and group j of ``g`` consecutive input features (the last group may be shorter):
``s = (max - min) / 15``,  ``z = round(-min / s)`` clamped to [0, 15],  ``q = clamp(round(W / s) + z, 0, 15)``,
``W ~ (q - z) * s``. The group always contains 0 in its range, so zeros stay exact (pruned weights remain 0).
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> q int8 [N, K], scale fp32 [N]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=_EPS)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], the last group padded with zeros."""
    n, k = w.shape
    padded = num_groups(k, group_size) * group_size
    if padded != k:
        w = torch.nn.functional.pad(w, (0, padded - k))
    return w.view(n, -1, group_size)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> q uint8 [N, K] (values 0..15), scale fp32 [N, G], zero fp32 [N, G]."""
    n, k = w.shape
    groups = _grouped(w.float(), group_size)
    low = groups.amin(dim=-1).clamp(max=0.0)
    high = groups.amax(dim=-1).clamp(min=0.0)
    scale = ((high - low) / 15.0).clamp(min=_EPS)
    zero = torch.round(-low / scale).clamp(0, 15)
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8)
    return q.view(n, -1)[:, :k].contiguous(), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    groups = _grouped(q.float(), group_size)
    w = (groups - zero.float()[..., None]) * scale.float()[..., None]
    return w.view(n, -1)[:, :k].to(dtype)
