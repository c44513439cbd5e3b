"""An int8 KV cache: one scale per block and K/V head, grown as the block fills.

Stored ``c`` int8 and scale ``s`` per (block, head) with ``x ~ c * s``. A write of new tokens into a block
raises ``s`` to ``max(s, max|x| / 127)`` over the new tokens of each head; when it grows, the block's earlier
codes are rescaled by ``s_old / s_new`` first (a fresh block has ``s = 0``, so whatever it held before is
wiped). Reads dequantize the gathered blocks to the compute dtype.
"""

from __future__ import annotations

import torch

_TINY = 1e-8


def write_int8(cache: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, x: torch.Tensor,
               touched: torch.Tensor, which: torch.Tensor) -> None:
    """cache int8 [NB, bs, Hk, D], scales fp32 [NB, Hk]; writes x [T, Hk, D] at ``slots`` [T], which fall in the
    distinct blocks ``touched`` [U], token t in block ``touched[which[t]]`` (``AttentionMetadata.block_writes``)."""
    heads = x.shape[1]
    absmax = x.detach().abs().amax(dim=-1).float()  # [T, Hk]
    need = torch.zeros(len(touched), heads, device=x.device).scatter_reduce_(
        0, which[:, None].expand(-1, heads), absmax / 127.0, reduce="amax")
    old = scales[touched]
    new = torch.maximum(old, need).clamp(min=_TINY)
    grown = (new > old).any(dim=-1)
    if grown.any():
        ids = touched[grown]
        ratio = (old[grown] / new[grown])[:, None, :, None]  # [R, 1, Hk, 1]
        cache[ids] = torch.round(cache[ids].float() * ratio).to(torch.int8)
    scales[touched] = new
    codes = torch.round(x.float() / new[which][:, :, None]).clamp(-127, 127).to(torch.int8)
    cache.view(-1, heads, x.shape[2]).index_copy_(0, slots, codes)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes int8 [B, nb, bs, Hk, D] with scales [B, nb, Hk] -> values [B, nb, bs, Hk, D] in ``dtype``."""
    return (codes.float() * scales[:, :, None, :, None]).to(dtype)
