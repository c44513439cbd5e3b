"""Per-step data the attention layers read without the model code passing it through every call."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSpan:
    """One sequence's run of several new tokens in this step (a prompt or a chunk of one).

    Its queries sit at rows [query_start, query_start + query_len) of the flat token batch and at positions
    [context_len, context_len + query_len) of the sequence; keys cover positions [0, context_len + query_len).
    """

    query_start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks_of_this_sequence] int64


@dataclass
class DecodeBatch:
    """The step's single-token decodes (rows [0, count) of the flat batch), attended together.

    The reference path gathers their keys through block tables padded to the longest sequence.
    """

    count: int
    block_tables: torch.Tensor  # [count, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [count] int64: keys each decode attends to, itself included
    max_seq_len: int
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[count, 1, 1, max_seq_len] bool: which gathered keys each decode may attend to. Built once per
        step and window, shared by every layer."""
        mask = self._masks.get(sliding_window)
        if mask is None:
            key_pos = torch.arange(self.max_seq_len, device=self.seq_lens.device).unsqueeze(0)
            seq_lens = self.seq_lens.unsqueeze(1)
            mask = key_pos < seq_lens
            if sliding_window is not None:
                mask &= key_pos > seq_lens - 1 - sliding_window
            mask = self._masks[sliding_window] = mask[:, None, None, :]
        return mask


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache.

    The flat batch holds the single-token decodes first, then the prefill spans.
    ``slot_mapping[t] = block * block_size + offset`` is where token ``t``'s K/V is written.
    """

    slot_mapping: torch.Tensor  # [T] int64
    decodes: DecodeBatch | None
    prefills: list[PrefillSpan]
    _block_writes: dict = field(default_factory=dict, repr=False)
    native: dict = field(default_factory=dict, repr=False)  # per-step structs of the native decoder layers

    def block_writes(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(touched [U], which [T]): the distinct blocks this step writes and, per token, its index among them.
        The same for every layer and for K and V, so an int8 cache computes it once per step."""
        writes = self._block_writes.get(block_size)
        if writes is None:
            blocks = torch.div(self.slot_mapping, block_size, rounding_mode="floor")
            writes = self._block_writes[block_size] = torch.unique(blocks, return_inverse=True)
        return writes


_current: AttentionMetadata | list[AttentionMetadata] | None = None


@contextmanager
def set_forward_context(metadata: AttentionMetadata | list[AttentionMetadata]):
    """``metadata``: one per KV-cache group (each group has its own block tables and slots), or one for all."""
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def get_attention_metadata(group: int = 0) -> AttentionMetadata:
    """The step's metadata for the layers of KV-cache group ``group``."""
    if _current is None:
        raise RuntimeError("attention ran outside set_forward_context(); the model runner sets it for each step")
    return _current[group] if isinstance(_current, list) else _current
