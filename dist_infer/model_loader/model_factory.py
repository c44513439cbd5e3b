"""Builds this rank's part of the model and fills it from the checkpoint."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dist_infer.config import ModelConfig
from dist_infer.layers.fused_moe import FusedMoE, expert_parallel
from dist_infer.model_loader.weights import load_weights
from dist_infer.models.registry import get_model_class


def build_model(model_config: ModelConfig, device: torch.device, layer_range: tuple[int, int] | None = None,
                is_first: bool = True, is_last: bool = True, after_each: Callable[[], None] | None = None,
                enable_expert_parallel: bool = False) -> nn.Module:
    """``after_each`` runs after every loaded tensor and every repacked module. ``enable_expert_parallel``: a
    mixture-of-experts model's experts are spread whole over the ep group (see ``layers.fused_moe``)."""
    cls = get_model_class(model_config.hf_config)
    # Parameters are created empty on the target device and filled straight from the mapped files.
    with torch.device(device), expert_parallel(enable_expert_parallel):
        model = cls(model_config.hf_config, model_config.torch_dtype, model_config.max_model_len,
                    layer_range=layer_range, is_first=is_first, is_last=is_last, quant_config=model_config.quant_config)
    load_weights(model, model_config.model, after_each)
    # Bytes this rank holds, counted as loaded (before any repacking); a tied table counts once.
    model.parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
            if after_each is not None:
                after_each()
    model.weight_bytes = weight_bytes(model)
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    model.expert_bytes = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
    model.local_experts = experts[0].expert_ids if experts else []
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy as it runs: quantized and repacked forms as held, each tensor once."""
    seen, total = set(), 0

    def count(t) -> None:
        nonlocal total
        if t is None or not t.numel():
            return
        key = t.untyped_storage().data_ptr()  # a tied table is one storage under two names
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for module in model.modules():
        if getattr(module, "quantized", None) is not None:
            for t in module.quantized.keep:
                count(t)
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            total += module.packed_bytes
        for p in module.parameters(recurse=False):
            count(p.data)
    return total
