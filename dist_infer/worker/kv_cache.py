"""The KV-cache tensors of one worker: allocation, binding to the attention layers, and int8 scale resets.

Per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] in the model's dtype, or int8 codes with
[2, num_blocks, num_kv_heads] scales (``kv_cache_dtype="int8"``: half the bytes of bf16, a quarter of fp32).

The whole pool is zero-filled when it is allocated. That touches every page, so the memory is really taken at
start: an over-committed host fails there rather than under load, and the process's resident memory reports
what the cache costs. It also keeps the cache free of NaNs: attention reads whole blocks and masks the unused
slots, and a masked NaN would still poison the output (0 * NaN); after that a block only holds what the model
wrote into it.
"""

from __future__ import annotations

import torch

from dist_infer.layers.attention import Attention, GatherWorkspace

KV_CACHE_DTYPES = ("auto", "int8")


class KVCacheStore:
    def __init__(self, layers: list[Attention], block_size: int, dtype: torch.dtype, kv_cache_dtype: str,
                 device: torch.device):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        self.layers, self.block_size, self.device = layers, block_size, device
        self.int8 = kv_cache_dtype == "int8"
        self.dtype = torch.int8 if self.int8 else dtype
        self.caches: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []

    def bytes_per_block(self) -> int:
        """One block across all layers: 2 (K and V) x block x heads x dim x element, plus int8 scales."""
        element = torch.empty(0, dtype=self.dtype).element_size()
        total = 0
        for layer in self.layers:
            total += 2 * self.block_size * layer.num_kv_heads * layer.head_dim * element
            if self.int8:
                total += 2 * layer.num_kv_heads * 4
        return total

    def allocate(self, num_blocks: int) -> None:
        workspace = GatherWorkspace(self.device)
        self.caches, self.scales = [], []
        for layer in self.layers:
            cache = torch.zeros(2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim,
                                dtype=self.dtype, device=self.device)
            scales = None
            if self.int8:
                scales = torch.zeros(2, num_blocks, layer.num_kv_heads, dtype=torch.float32, device=self.device)
                self.scales.append(scales)
            layer.bind_kv_cache(cache, workspace, scales)
            self.caches.append(cache)

    def prepare_blocks(self, block_ids: list[int], fresh_from: int = 0) -> None:
        """Blocks a request was just given: ``block_ids[fresh_from:]`` are about to be written (the ones before
        are prefix-cache hits) and, with an int8 cache, start with scales of 0 (a block's scale only grows as
        tokens are written into it). Nothing to do for other caches, which every step passes through here."""
        if not self.int8:
            return
        fresh = block_ids[fresh_from:]
        if fresh:
            index = torch.tensor(fresh, dtype=torch.long, device=self.device)
            for scales in self.scales:
                scales.index_fill_(1, index, 0.0)
