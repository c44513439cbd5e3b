"""Runs a dist-infer model on one prompt outside the engine, for checking logits against a reference."""

from __future__ import annotations

import torch

from dist_infer.layers.attention import Attention
from dist_infer.layers.forward_context import AttentionMetadata, PrefillSpan, set_forward_context


@torch.inference_mode()
def forward_logits(model, prompt: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits [vocab] at the prompt's last position, with a private KV cache just large enough for it.

    ``model`` may be a list of pipeline stages, run in order with (hidden, residual) handed along."""
    stages = model if isinstance(model, list) else [model]
    n = len(prompt)
    num_blocks = -(-n // block_size)
    saved = []
    for stage in stages:
        dtype = next(p for p in stage.parameters() if p.is_floating_point()).dtype
        for layer in stage.modules():
            if isinstance(layer, Attention):
                saved.append((layer, layer.kv_cache))
                layer.bind_kv_cache(torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                                dtype=dtype))
    try:
        table = torch.arange(num_blocks)
        meta = AttentionMetadata(slot_mapping=torch.arange(n), decodes=None, prefills=[PrefillSpan(0, n, 0, table)])
        ids, positions = torch.tensor(prompt), torch.arange(n)
        carried = (None, None)
        with set_forward_context(meta):
            for stage in stages:
                carried = stage(ids, positions, *carried)
        return stages[-1].compute_logits(carried[-1:])[0]
    finally:
        for layer, cache in saved:
            if cache is not None:
                layer.bind_kv_cache(cache)
