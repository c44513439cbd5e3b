"""Attention over a paged KV cache, in plain PyTorch (the reference path on every device).

Cache layout per layer: ``kv_cache`` [2, num_blocks, block_size, num_kv_heads, head_dim]; token at position
``m`` of a sequence with block table ``bt`` lives in block ``bt[m // block_size]`` at offset
``m % block_size``.

Each step: the new K/V of every token are written to their slots, then

* decodes (one query each): ``softmax(q K^T * scale + mask) V`` over keys gathered through the block tables,
  batched over sequences with keys past each sequence's length masked out;
* prefill spans: causal attention of the span's queries over the sequence's keys -- taken straight from this
  step's K/V when the span starts at position 0, else gathered from the cache (earlier chunks, cached prefix).

Grouped-query attention shares each K/V head among ``num_heads / num_kv_heads`` query heads. A sliding
window ``w`` (Mistral) restricts query position ``m`` to keys at positions ``> m - w``. A sliding layer's blocks
before the window may have been given back: their table entries point at the null block, which the masks hide.

Logit soft-capping (Gemma 2) bounds each score before the softmax: ``s' = c * tanh(s / c)`` with
``s = q k^T * scale``. PyTorch's SDPA cannot do that, so a capped layer computes its scores explicitly
(``softcapped_attention``) and skips the native decode kernel; uncapped layers keep SDPA and the kernel.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.layers.forward_context import get_attention_metadata
from dist_infer.layers.kv_int8 import dequantize_rows, write_int8
from dist_infer.layers.native_kernels import paged_decode, paged_decode_kernel


class GatherWorkspace:
    """One reusable buffer (per dtype) for the keys and values a layer gathers from the cache.

    Layers run one after another, so they can share it; reusing it matters because a fresh multi-megabyte
    allocation per layer and step is handed out by the OS page by page, which costs more than the copy.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < 2 * numel:
            buffer = self.buffers[dtype] = torch.empty(2 * numel, dtype=dtype, device=self.device)
        return buffer[:numel], buffer[numel:2 * numel]


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False, scale: float = 1.0, enable_gqa: bool = False, *,
                         softcap: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with capped scores: ``softmax(c tanh(q k^T scale / c) + mask) v``.

    q [B, Hq, n, D], k/v [B, Hk, L, D] (Hk divides Hq), ``attn_mask`` bool broadcastable to [B, Hq, n, L];
    ``is_causal`` aligns the n queries with the last n keys. Softmax in fp32, as the reference does.
    """
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    n, length = q.shape[-2], k.shape[-2]
    if is_causal:
        attn_mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.gqa = num_heads != num_kv_heads
        self.kv_cache: torch.Tensor | None = None
        self._sdpa = F.scaled_dot_product_attention if logit_softcap is None else functools.partial(
            softcapped_attention, softcap=logit_softcap)
        self.kv_group = 0

    def bind_kv_cache(self, kv_cache: torch.Tensor, workspace: GatherWorkspace | None = None,
                      kv_scales: torch.Tensor | None = None, kv_group: int = 0) -> None:
        """Attaches this layer's cache [2, num_blocks, block_size, num_kv_heads, head_dim] and the gather
        buffer it shares with the other layers of its model. An int8 cache comes with ``kv_scales``
        [2, num_blocks, num_kv_heads] (see ``kv_int8.py``). ``kv_group``: the KV-cache group whose blocks the
        cache holds; the layer reads that group's slots and block tables from the forward context."""
        self.kv_cache, self.kv_scales, self.kv_group = kv_cache, kv_scales, kv_group
        self.workspace = workspace or GatherWorkspace(kv_cache.device)
        self._native = None
        # The native kernel cannot cap scores; capped layers take the PyTorch path.
        native_dtype = kv_cache.dtype in (torch.float32, torch.int8)
        if kv_cache.device.type == "cpu" and native_dtype and self.logit_softcap is None:
            self._native = paged_decode_kernel()  # used for fp32 queries (see _decode)
        num_blocks = kv_cache.shape[1]
        # Slot-indexed views for the writes: [2, num_blocks * block_size, num_kv_heads, head_dim].
        self._slots = kv_cache.view(2, -1, self.num_kv_heads, self.head_dim)
        # Block-indexed rows for the reads: gathering whole contiguous rows with index_select is several
        # times faster than advanced indexing into the 5-D cache.
        self._k_blocks = kv_cache[0].view(num_blocks, -1)
        self._v_blocks = kv_cache[1].view(num_blocks, -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hk*D] -> [T, Hq*D]."""
        meta = get_attention_metadata(self.kv_group)
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.kv_scales is None:
            self._slots[0].index_copy_(0, meta.slot_mapping, k)
            self._slots[1].index_copy_(0, meta.slot_mapping, v)
        else:
            touched, which = meta.block_writes(self.kv_cache.shape[2])
            write_int8(self.kv_cache[0], self.kv_scales[0], meta.slot_mapping, k, touched, which)
            write_int8(self.kv_cache[1], self.kv_scales[1], meta.slot_mapping, v, touched, which)

        decodes = meta.decodes
        if decodes is not None and decodes.count == T:
            return self._decode(q, decodes).flatten(1)
        out = torch.empty_like(q)
        if decodes is not None:
            out[:decodes.count] = self._decode(q[:decodes.count], decodes)
        for span in meta.prefills:
            rows = slice(span.query_start, span.query_start + span.query_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], span)
        return out.flatten(1)

    def _gather(self, block_tables: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """block_tables [B, nb] -> keys, values [B, Hk, length, D] in ``dtype``, read from the cache."""
        B, nb = block_tables.shape
        index = block_tables.reshape(-1)
        row = self._k_blocks.shape[1]
        k_out, v_out = self.workspace.take(index.numel() * row, self.kv_cache.dtype)
        keys = torch.index_select(self._k_blocks, 0, index, out=k_out.view(-1, row))
        values = torch.index_select(self._v_blocks, 0, index, out=v_out.view(-1, row))
        if self.kv_scales is not None:
            blocks = (B, nb, -1, self.num_kv_heads, self.head_dim)
            keys = dequantize_rows(keys.view(blocks), self.kv_scales[0][block_tables], dtype)
            values = dequantize_rows(values.view(blocks), self.kv_scales[1][block_tables], dtype)
        shape = (B, -1, self.num_kv_heads, self.head_dim)
        keys, values = keys.view(shape), values.view(shape)
        return keys[:, :length].transpose(1, 2), values[:, :length].transpose(1, 2)

    def _decode(self, q: torch.Tensor, decodes) -> torch.Tensor:
        """q [B, Hq, D] -> [B, Hq, D]. The G = Hq/Hk query heads sharing a K/V head attend as G query rows
        of that head, so K/V are never expanded."""
        if self._native is not None and q.dtype == torch.float32:
            return paged_decode(self._native, q, self.kv_cache[0], self.kv_cache[1], decodes.block_tables,
                                decodes.seq_lens, self.scale, self.sliding_window, self.kv_scales)
        B = q.shape[0]
        keys, values = self._gather(decodes.block_tables, decodes.max_seq_len, q.dtype)
        grouped = q.view(B, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = self._sdpa(grouped, keys, values, attn_mask=decodes.mask(self.sliding_window), scale=self.scale)
        return out.view(B, self.num_heads, self.head_dim)

    def _prefill(self, q, k, v, span) -> torch.Tensor:
        n, ctx = span.query_len, span.context_len
        total = ctx + n
        q = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if ctx == 0:
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        else:
            keys, values = self._gather(span.block_table.unsqueeze(0), total, q.dtype)
        if ctx == 0 and (self.sliding_window is None or total <= self.sliding_window):
            out = self._sdpa(q, keys, values, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
        else:
            q_pos = torch.arange(ctx, total, device=q.device).unsqueeze(1)
            k_pos = torch.arange(total, device=q.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask &= k_pos > q_pos - self.sliding_window
            out = self._sdpa(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa)
        return out.squeeze(0).transpose(0, 1)
