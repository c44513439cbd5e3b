"""Keep-masks for weight pruning (bool, the weight's shape ``[out, in]``; ``True`` = keep), from any score matrix
(``|W|`` for magnitude pruning, ``|W_ij| * ||X_j||_2`` for Wanda). ``topk`` rather than a threshold gives exact
counts even with ties."""

from __future__ import annotations

import torch


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop exactly ``round(sparsity * numel)`` weights of least ``|w|`` over the whole matrix."""
    k = round(sparsity * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(weight.abs().flatten(), k, largest=False).indices] = False
    return keep.view_as(weight)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the ``round(sparsity * in)`` lowest scores of every row (each output compared only with itself)."""
    k = round(sparsity * scores.shape[1])
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return keep


def check_two_four(name: str, in_features: int) -> None:
    if in_features % 4:
        raise ValueError(f"2:4 pruning needs the input dimension of {name} to be divisible by 4, got {in_features}")


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """2:4 sparsity: ``scores [out, in]`` viewed as ``[out, in/4, 4]``, keep the top-2 ``|score|`` of every 4
    (a weight matrix itself gives magnitude 2:4)."""
    out_features, in_features = scores.shape
    check_two_four("weight", in_features)
    groups = scores.abs().reshape(out_features, in_features // 4, 4)
    keep = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view(out_features, in_features)
