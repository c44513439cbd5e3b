"""RMSNorm: ``y = w * x / sqrt(mean(x^2) + eps)``, statistics in fp32 whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalize in fp32, round, then scale (the order the reference models use).
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With ``residual``: ``r' = x + residual``, returns ``(norm(r'), r')`` -- the pre-norm block's
        add-then-normalize, so the residual stream travels beside the normalized activations."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: ``y = (1 + w) * x / sqrt(mean(x^2) + eps)``, the checkpoint storing ``w`` as an offset
    from 1. Unlike ``RMSNorm`` in half precision, the scale is applied in fp32 and the result rounded once."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        return F.rms_norm(x.float(), self.weight.shape, scale, self.eps).to(x.dtype)
