"""RMSNorm: ``y = w * x / sqrt(mean(x^2) + eps)``, statistics in fp32 whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.layers.native_kernels import add_rms_norm, rms_norm_kernel

_UNSET = object()


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self._native = _UNSET  # the native fp32 kernel (native_kernels.add_rms_norm), looked up on first use

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalize in fp32, round, then scale (the order the reference models use).
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)

    def _native_kernel(self, x: torch.Tensor, residual: torch.Tensor | None):
        """The native kernel where it computes exactly this: fp32 on the CPU, contiguous 2-D rows, this class's
        own norm (not a subclass's)."""
        if self._native is _UNSET:
            plain = type(self)._norm is RMSNorm._norm and self.weight.dtype == torch.float32
            self._native = rms_norm_kernel() if plain and self.weight.device.type == "cpu" else None
        if self._native is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
            return None
        if residual is not None and (residual.dtype != torch.float32 or not residual.is_contiguous()
                                     or residual.shape != x.shape):
            return None
        return self._native

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With ``residual``: ``r' = x + residual``, returns ``(norm(r'), r')`` -- the pre-norm block's
        add-then-normalize, so the residual stream travels beside the normalized activations."""
        native = self._native_kernel(x, residual)
        if native is not None:
            y, r = add_rms_norm(native, x, residual, self.weight, self.eps)
            return y if residual is None else (y, r)
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
