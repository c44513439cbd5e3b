"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models").

A weight's score is its magnitude times the L2 norm of the input channel it multiplies,

    S_ij = |W_ij| * ||X_j||_2        (W [out, in], X [tokens, in] the calibration inputs of the layer),

so a small weight on a channel that carries large activations can outrank a larger weight on a quiet one.
Scores are compared within each output row (each output is a sum over its row; the paper found this grouping
better for LLMs than per-layer): unstructured drops the ``round(sparsity * in)`` lowest of every row, 2:4 keeps
the 2 highest of every 4 consecutive inputs of a row. No weight is updated: pruned weights just become zero.

Calibration is sequential (``activation_stats.sequential_input_norms``): each block is measured on the outputs of
the already-pruned blocks before it.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_infer.compression.activation_stats import sequential_input_norms
from dist_infer.compression.masks import row_mask, two_four_mask


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` ``[out, in]`` for ``weight [out, in]`` and input norms ``norms [in]``."""
    return weight.abs().double() * norms.double()[None, :]


def prune_wanda(model, layers: list[nn.Module], batches: list[torch.Tensor], method: str, sparsity: float,
                show_progress: bool = False) -> None:
    """Zero the Wanda-pruned weights of every block linear in place (``method``: ``unstructured`` or ``2:4``)."""

    def prune(index: int, layer: nn.Module, norms: dict[str, torch.Tensor]) -> None:
        for key, norm in norms.items():
            w = layer.get_submodule(key).weight
            scores = wanda_scores(w, norm)
            w.mul_(row_mask(scores, sparsity) if method == "unstructured" else two_four_mask(scores))

    sequential_input_norms(model, layers, batches, prune, show_progress)
