"""Rotary position embedding (RoPE), with the scaled variants Llama-family checkpoints use.

For a head vector ``x`` of size ``d`` split into halves ``x = [x1, x2]`` and position ``m``:
``rope(x, m) = x * cos(m * theta) + rotate_half(x) * sin(m * theta)`` with ``rotate_half(x) = [-x2, x1]``,
``theta_i = inv_freq[i]`` repeated over both halves. The inverse frequencies (plain, ``linear``, ``llama3``,
``yarn``, ``longrope``) come from ``transformers``' RoPE initializers so that they match the checkpoint's
reference implementation exactly. cos/sin are tabled once for every position up to the context length.
"""

from __future__ import annotations

import torch
from torch import nn

_SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope")


def rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not params:
        # Older configs keep these as top-level fields.
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention_scaling) for the checkpoint's RoPE type."""
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type not in _SUPPORTED:
        raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {', '.join(_SUPPORTED)}")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int, dtype: torch.dtype):
        super().__init__()
        # Tabled on the CPU in fp32 (as the reference computes them), then moved to the device the model is
        # being built on (the ambient torch.device context).
        device = torch.empty(0).device
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
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
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
