"""Quantize and dequantize weights [out, in] (the reference definitions every kernel must reproduce).

int8, per output channel n:  ``s_n = max_k |W_nk| / 127``,  ``q = round(W / s_n)`` in [-127, 127],  ``W ~ q * s_n``.
int4, per output channel n and group j of ``g`` consecutive input features (the last group may be shorter):
``s = (max - min) / 15``,  ``z = -min / s`` (a real number, not rounded),  ``q = clamp(round(W / s + z), 0, 15)``,
``W ~ (q - z) * s``. The 16 levels span exactly ``[min, max]`` of the group -- GGUF's Q4_1 grid -- so a Q4_1
checkpoint requantized at group 32 comes back unchanged; an integer zero point would shift the grid by up to
half a step and cost accuracy (measured: +17 % perplexity against +0.05 % on SmolLM2 at group 32).
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def quantize_int8(w: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> q int8 [N, K], scale fp32 [N]. ``absmax`` [N]: the rows' maximum when ``w`` holds only part of
    each row (a row-parallel shard), so every shard shares the scale of the whole row."""
    w = w.float()
    scale = ((w.abs().amax(dim=1) if absmax is None else absmax.float()) / 127.0).clamp(min=_EPS)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], the last group padded by repeating its last value (so padding never widens a range)."""
    n, k = w.shape
    padded = num_groups(k, group_size) * group_size
    if padded != k:
        w = torch.nn.functional.pad(w[None], (0, padded - k), mode="replicate")[0]
    return w.view(n, -1, group_size)


def int4_grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the 16 levels spanning [low, high]."""
    scale = ((high - low) / 15.0).clamp(min=_EPS)
    return scale, -low / scale


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes of ``w`` on the grid (scale, zero), all broadcast together."""
    return torch.clamp(torch.round(w / scale + zero), 0, 15)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> q uint8 [N, K] (values 0..15), scale fp32 [N, G], zero fp32 [N, G]."""
    n, k = w.shape
    groups = grouped(w.float(), group_size)
    scale, zero = int4_grid(groups.amin(dim=-1), groups.amax(dim=-1))
    q = int4_codes(groups, scale[..., None], zero[..., None]).to(torch.uint8)
    return q.view(n, -1)[:, :k].contiguous(), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    groups = grouped(q.float(), group_size)
    w = (groups - zero.float()[..., None]) * scale.float()[..., None]
    return w.view(n, -1)[:, :k].to(dtype)
