"""Prompt log-probabilities from a prefill's hidden states, a bounded number of rows at a time.

A prompt ``x_0 .. x_{P-1}`` gets a logprob for every position ``j >= 1``, read off the final hidden state
``h_{j-1}`` of the token before it (the row that would predict the next token):

    z = W h_{j-1}                                  logits over the whole vocabulary, [V] (fp32)
    logprob(x_j) = z[x_j] - logsumexp(z)           = log_softmax(z)[x_j]
    rank(x_j)    = 1 + #{t : z_t > z[x_j]}         (1 = most likely; ties share the better rank, as the sampler's)
    top-k        = the k largest log_softmax(z), most likely first

The LM head is vocabulary-parallel: ``compute_logits`` gathers every tensor-parallel rank's slice, so the
softmax, the rank and the top-k above run over the full vocabulary on each rank (every rank must call it, in
the same order, for the gather; only the rank that returns results keeps them). Rows go through
``max_rows`` at a time -- by default as many as fit ``MAX_LOGITS_ELEMENTS`` fp32 logits -- so a long prompt
never holds its whole ``[P, V]`` logits: the extra memory is ``O(max_rows * V)``, not ``O(P * V)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Logits held at once: 4 Mi fp32 values (16 MiB, x2 with their log_softmax), e.g. 85 rows of a 49k vocabulary.
MAX_LOGITS_ELEMENTS = 1 << 22


@dataclass
class TokenLogprobRows:
    """Per scored row: the target token's logprob and rank, and the top-``k`` ids and logprobs."""

    logprobs: torch.Tensor  # [R] float32
    ranks: torch.Tensor  # [R] long, 1 = most likely
    top_ids: torch.Tensor  # [R, k] long
    top_logprobs: torch.Tensor  # [R, k] float32


def rows_per_chunk(vocab_size: int, max_elements: int | None = None) -> int:
    """How many rows of ``vocab_size`` logits fit ``max_elements`` (at least one)."""
    budget = MAX_LOGITS_ELEMENTS if max_elements is None else max_elements
    return max(1, budget // max(1, vocab_size))


def target_logprobs(hidden: torch.Tensor, targets: torch.Tensor, num_top: int,
                    compute_logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int,
                    max_rows: int | None = None, keep: bool = True) -> TokenLogprobRows | None:
    """``hidden`` [R, H] rows, ``targets`` [R] the token each row is scored on -> their logprobs and ranks and
    the top-``num_top`` of each row (``num_top`` is capped at ``vocab_size``).

    ``compute_logits`` maps [r, H] -> [r, V] (a collective under tensor parallelism: every rank calls this with
    the same rows). ``keep=False``: join the collectives only and return None (ranks that do not report)."""
    rows = max_rows if max_rows is not None else rows_per_chunk(vocab_size)
    k = min(num_top, vocab_size)
    parts = []
    for begin in range(0, hidden.shape[0], rows):
        logits = compute_logits(hidden[begin:begin + rows])
        if not keep:
            continue
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        del logits
        chosen = logprobs.gather(1, targets[begin:begin + rows].unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
        if k > 0:
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)
        else:
            top_logprobs = logprobs.new_empty(chosen.shape[0], 0)
            top_ids = torch.empty(chosen.shape[0], 0, dtype=torch.long, device=logprobs.device)
        parts.append((chosen, ranks, top_ids, top_logprobs))
    if not keep:
        return None
    if not parts:
        empty = torch.empty(0, device=hidden.device)
        return TokenLogprobRows(empty, empty.long(), empty.long().view(0, k), empty.view(0, k))
    return TokenLogprobRows(*(torch.cat(column) for column in zip(*parts)))
