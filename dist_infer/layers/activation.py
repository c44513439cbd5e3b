"""Gated activations over the last dimension: ``[g, u] -> act(g) * u``.

SwiGLU (Llama, Phi-3): ``act = silu``. GeGLU (Gemma): ``act = gelu`` with the tanh approximation
``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2d] -> [..., d]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2d] -> [..., d]."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


# The config's ``hidden_act`` / ``hidden_activation`` name -> its gated form.
_GATED = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul, "gelu_tanh": GeluTanhAndMul}


def gated_activation(name: str) -> nn.Module:
    if name not in _GATED:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(sorted(_GATED))}")
    return _GATED[name]()
