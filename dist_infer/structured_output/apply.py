"""Applying a grammar bitmask to logits: tokens whose bit is 0 get -inf, in place.

xgrammar's ``apply_token_bitmask_inplace`` (a C++ loop on a CPU, a CUDA kernel on a GPU) reads the packed
int32 words directly. On this CPU, at batch 32 and a 49k vocabulary, it costs about what a copy of the logits
does, while unpacking the words into a [B, V] bool mask and ``masked_fill`` costs several times more
(``benchmarks/bench_grammar_engines.py`` prints both), so the grammar does not go through
``SamplingBatch.allowed``.
"""

from __future__ import annotations

import torch


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None) -> None:
    """``logits`` [B, V] (modified), ``bitmask`` int32 [B, ceil(V / 32)] on the same device, ``rows`` the rows
    to mask (None: all)."""
    import xgrammar as xgr  # lazily: only steps with a constrained request pay the import

    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
