"""Lays out one step's tokens as a flat batch and describes where their keys and values live.

Rows: the single-token decodes first (attended as one batch), then each prompt chunk. Each KV-cache group
(``kv_cache_groups``) has its own block tables, hence its own slots and ``AttentionMetadata``.
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
    metadata: list[AttentionMetadata]  # per KV-cache group
    sample_rows: torch.Tensor  # [S] rows whose output is sampled
    sampled: list[CachedRequestState]  # the S requests sampled this step, in row order
    first_rows: dict[str, int]  # each request's first row: its token at num_computed_tokens


def build_step_inputs(states: list[CachedRequestState], counts: list[int], block_size: int,
                      device: torch.device) -> StepInputs:
    """``counts[i]`` new tokens of ``states[i]``, which holds ``num_computed_tokens`` already."""
    decodes = [s for s, n in zip(states, counts) if n == 1]
    rows = [(s, 1) for s in decodes] + [(s, n) for s, n in zip(states, counts) if n != 1]
    ids, pos, sample_rows, sampled = [], [], [], []
    first_rows: dict[str, int] = {}
    row = 0
    for state, n in rows:
        start, end = state.num_computed_tokens, state.num_computed_tokens + n
        first_rows[state.req_id] = row
        ids.extend(state.token_ids[start:end])
        pos.extend(range(start, end))
        if end == len(state.token_ids):  # caught up: the next token is new, sample it
            sample_rows.append(row + n - 1)
            sampled.append(state)
        row += n
    num_groups = len(states[0].block_ids) if states else 1
    metadata = [_group_metadata(rows, len(decodes), g, block_size, device) for g in range(num_groups)]
    return StepInputs(torch.tensor(ids, dtype=torch.long, device=device),
                      torch.tensor(pos, dtype=torch.long, device=device), metadata,
                      torch.tensor(sample_rows, dtype=torch.long, device=device), sampled, first_rows)


def _group_metadata(rows: list[tuple[CachedRequestState, int]], num_decodes: int, group: int, block_size: int,
                    device: torch.device) -> AttentionMetadata:
    """Slots and block tables of KV-cache group ``group`` for the step's ``rows`` (the decodes first)."""
    slots, prefills = [], []
    row = 0
    for state, n in rows:
        start, blocks = state.num_computed_tokens, state.block_ids[group]
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        if n != 1:
            prefills.append(PrefillSpan(row, n, start, torch.tensor(blocks, dtype=torch.long, device=device)))
        row += n
    batch = None
    if num_decodes:
        decodes = [state for state, _ in rows[:num_decodes]]
        width = max(len(d.block_ids[group]) for d in decodes)
        tables = [d.block_ids[group] + [0] * (width - len(d.block_ids[group])) for d in decodes]
        lens = [d.num_computed_tokens + 1 for d in decodes]
        batch = DecodeBatch(len(decodes), torch.tensor(tables, dtype=torch.long, device=device),
                            torch.tensor(lens, dtype=torch.long, device=device), max(lens))
    return AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=device), batch, prefills)
