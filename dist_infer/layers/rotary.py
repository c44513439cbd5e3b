"""Rotary position embedding (RoPE), with the scaled variants Llama-family checkpoints use.

For a head vector ``x`` of size ``d`` split into halves ``x = [x1, x2]`` and position ``m``:
``rope(x, m) = x * cos(m * theta) + rotate_half(x) * sin(m * theta)`` with ``rotate_half(x) = [-x2, x1]``,
``theta_i = inv_freq[i]`` repeated over both halves. The inverse frequencies (plain, ``linear``, ``llama3``,
``yarn``, ``longrope``) come from ``transformers``' RoPE initializers so that they match the checkpoint's
reference implementation exactly. cos/sin are tabled once for every position up to the context length.

Partial rotary (``partial_rotary_factor`` f < 1, Phi-4-mini): only the first ``r = int(f * d)`` features of
each head rotate; the rest pass through. Per-layer-type parameters (Gemma 3: ``rope_parameters`` keyed by
``sliding_attention`` / ``full_attention``, each with its own base) give one table per layer type.

LongRoPE (Phi-3) has two factor sets: Hugging Face rotates with ``short_factor`` while the whole sequence
fits ``original_max_position_embeddings`` and with ``long_factor`` for a forward pass that reaches past it,
so a sequence's earlier keys may have been rotated with the other set. A paged, prefix-cached KV cache needs
one rotation per position, so we choose once, as vLLM does: ``long_factor`` when the serving context
(``max_model_len``) exceeds ``original_max_position_embeddings``, else ``short_factor``. Sequences shorter
than the original context match Hugging Face exactly when ``max_model_len`` fits it; with a longer
``max_model_len``, prompts longer than the original context match it exactly.
"""

from __future__ import annotations

import torch
from torch import nn

_SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope")


def rope_layer_types(hf_config) -> list[str] | None:
    """The layer types with RoPE parameters of their own (Gemma 3), or None when one set serves every layer."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and all(isinstance(params.get(t), dict) for t in set(layer_types)):
        return sorted(set(layer_types))
    return None


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    if not params:
        # Older configs keep these as top-level fields.
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(hf_config, head_dim: int, max_positions: int | None = None,
                        layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [r/2], attention_scaling) for the checkpoint's RoPE type, ``r`` the rotated features of a head.
    ``max_positions`` (the serving context) picks LongRoPE's factor set (see the module docstring)."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in _SUPPORTED:
        raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {', '.join(_SUPPORTED)}")
    if rope_type == "default":
        base = params["rope_theta"]
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    if rope_type == "longrope":
        kwargs["seq_len"] = max_positions
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int, dtype: torch.dtype,
                 layer_type: str | None = None):
        super().__init__()
        # Tabled on the CPU in fp32 (as the reference computes them), then moved to the device the model is
        # being built on (the ambient torch.device context).
        device = torch.empty(0).device
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim, max_positions, layer_type)
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device=device, dtype=dtype), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``positions`` [T], shaped [T, 1, D] to broadcast over heads; computed once per step."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, H, D] -> rotated x; Q and K heads can be rotated together in one call."""
        cos, sin = cos_sin
        rotary = cos.shape[-1]
        if rotary < x.shape[-1]:  # partial rotary: the tail of each head passes through
            return torch.cat([RotaryEmbedding.apply(x[..., :rotary], cos_sin), x[..., rotary:]], dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
