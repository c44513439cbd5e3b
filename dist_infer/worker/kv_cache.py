"""The KV-cache tensors of one worker: allocation, binding to the attention layers, and int8 scale resets.

Per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] in the model's dtype, or int8 codes with
[2, num_blocks, num_kv_heads] scales (``kv_cache_dtype="int8"``: half the bytes of bf16, a quarter of fp32), where
``num_blocks`` is that of the layer's KV-cache group (``kv_cache_groups``), plus the null block in a sliding group.

The whole pool is zero-filled when it is allocated. That touches every page, so the memory is really taken at
start: an over-committed host fails there rather than under load, and the process's resident memory reports
what the cache costs. It also keeps the cache free of NaNs: attention reads whole blocks and masks the unused
slots, and a masked NaN would still poison the output (0 * NaN); after that a block only holds what the model
wrote into it.
"""

from __future__ import annotations

import torch

from dist_infer.kv_cache_groups import KVCacheGroups
from dist_infer.layers.attention import Attention, GatherWorkspace

KV_CACHE_DTYPES = ("auto", "int8")


class KVCacheStore:
    def __init__(self, layers: list[Attention], block_size: int, dtype: torch.dtype, kv_cache_dtype: str,
                 device: torch.device, groups: KVCacheGroups = KVCacheGroups()):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        self.layers, self.block_size, self.device, self.groups = layers, block_size, device, groups
        self.layer_groups = [groups.group_of(layer.sliding_window) for layer in layers]
        self.int8 = kv_cache_dtype == "int8"
        self.dtype = torch.int8 if self.int8 else dtype
        self.caches: list[torch.Tensor] = []
        self.scales: list[list[torch.Tensor]] = [[] for _ in range(len(groups))]  # per group, per layer
        self.num_blocks: list[int] = [0] * len(groups)

    def group_bytes_per_block(self) -> list[int]:
        """Per group, one block across its layers here: 2 (K and V) x block x heads x dim x element, plus int8
        scales (0 for a group without layers on this worker)."""
        element = torch.empty(0, dtype=self.dtype).element_size()
        totals = [0] * len(self.groups)
        for layer, group in zip(self.layers, self.layer_groups):
            totals[group] += 2 * self.block_size * layer.num_kv_heads * layer.head_dim * element
            if self.int8:
                totals[group] += 2 * layer.num_kv_heads * 4
        return totals

    def bytes_per_block(self) -> int:
        """One block in every group (today's layout: every layer holds the same blocks)."""
        return sum(self.group_bytes_per_block())

    def allocated_bytes(self) -> int:
        return sum((n + self.groups.null_blocks(g)) * b
                   for g, (n, b) in enumerate(zip(self.num_blocks, self.group_bytes_per_block())))

    def allocate(self, num_blocks: int | list[int]) -> None:
        """``num_blocks``: usable blocks per group (an int: the same for every group)."""
        self.num_blocks = [num_blocks] * len(self.groups) if isinstance(num_blocks, int) else list(num_blocks)
        workspace = GatherWorkspace(self.device)
        self.caches, self.scales = [], [[] for _ in range(len(self.groups))]
        for layer, group in zip(self.layers, self.layer_groups):
            n = self.num_blocks[group] + self.groups.null_blocks(group)
            cache = torch.zeros(2, n, self.block_size, layer.num_kv_heads, layer.head_dim,
                                dtype=self.dtype, device=self.device)
            scales = None
            if self.int8:
                scales = torch.zeros(2, n, layer.num_kv_heads, dtype=torch.float32, device=self.device)
                self.scales[group].append(scales)
            layer.bind_kv_cache(cache, workspace, scales, group)
            self.caches.append(cache)

    def prepare_blocks(self, block_ids: list[list[int]], fresh_from: int = 0) -> None:
        """Blocks a request was just given, per group: ``block_ids[g][fresh_from:]`` are about to be written (the
        ones before are prefix-cache hits or nulls) and, with an int8 cache, start with scales of 0 (a block's
        scale only grows as tokens are written into it). Nothing to do for other caches, which every step passes
        through here."""
        if not self.int8:
            return
        for ids, scales_of_group in zip(block_ids, self.scales):
            fresh = ids[fresh_from:]
            if fresh and scales_of_group:
                index = torch.tensor(fresh, dtype=torch.long, device=self.device)
                for scales in scales_of_group:
                    scales.index_fill_(1, index, 0.0)
