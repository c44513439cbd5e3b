"""Lays out one step's tokens as a flat batch and describes where their keys and values live.

Rows: the single-token decodes first (attended as one batch), then each prompt chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_infer.layers.forward_context import AttentionMetadata, DecodeBatch, PrefillSpan
from dist_infer.worker.request_state import CachedRequestState


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows whose output is sampled
    sampled: list[CachedRequestState]  # the S requests sampled this step, in row order
    first_rows: dict[str, int]  # each request's first row: its token at num_computed_tokens


def build_step_inputs(states: list[CachedRequestState], counts: list[int], block_size: int,
                      device: torch.device) -> StepInputs:
    """``counts[i]`` new tokens of ``states[i]``, which holds ``num_computed_tokens`` already."""
    decodes = [s for s, n in zip(states, counts) if n == 1]
    chunks = [(s, n) for s, n in zip(states, counts) if n != 1]
    ids, pos, slots, sample_rows, sampled = [], [], [], [], []
    prefills = []
    first_rows: dict[str, int] = {}
    row = 0
    for state, n in [(s, 1) for s in decodes] + chunks:
        start, end = state.num_computed_tokens, state.num_computed_tokens + n
        first_rows[state.req_id] = row
        blocks = state.block_ids
        ids.extend(state.token_ids[start:end])
        pos.extend(range(start, end))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        if n != 1:
            prefills.append(PrefillSpan(row, n, start, torch.tensor(blocks, dtype=torch.long, device=device)))
        if end == len(state.token_ids):  # caught up: the next token is new, sample it
            sample_rows.append(row + n - 1)
            sampled.append(state)
        row += n

    batch = None
    if decodes:
        width = max(len(d.block_ids) for d in decodes)
        tables = [d.block_ids + [0] * (width - len(d.block_ids)) for d in decodes]
        lens = [d.num_computed_tokens + 1 for d in decodes]
        batch = DecodeBatch(len(decodes), torch.tensor(tables, dtype=torch.long, device=device),
                            torch.tensor(lens, dtype=torch.long, device=device), max(lens))
    metadata = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=device), batch, prefills)
    return StepInputs(torch.tensor(ids, dtype=torch.long, device=device),
                      torch.tensor(pos, dtype=torch.long, device=device), metadata,
                      torch.tensor(sample_rows, dtype=torch.long, device=device), sampled, first_rows)
