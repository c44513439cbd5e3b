"""Gated activations over the last dimension: ``[g, u] -> act(g) * u``.

SwiGLU (Llama, Phi-3): ``act = silu``. GeGLU (Gemma): ``act = gelu`` with the tanh approximation
``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``. SwiGLU on fp32 CPU rows runs natively (one call instead
of three ops; ``native/silu_mul.c``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.layers.native_kernels import silu_mul, silu_mul_kernel

_UNSET = object()


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        self._native = _UNSET  # native_kernels.silu_mul, looked up on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2d] -> [..., d]."""
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous():
            if self._native is _UNSET:
                self._native = silu_mul_kernel()
            if self._native is not None:
                return silu_mul(self._native, x)
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
