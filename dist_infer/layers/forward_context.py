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
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache.

    The flat batch holds ``num_decode_tokens`` single-token decodes first (one per sequence), then the
    prefill spans. ``slot_mapping[t] = block * block_size + offset`` is where token ``t``'s K/V is written.
    """

    slot_mapping: torch.Tensor  # [T] int64
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64, padded with 0
    decode_seq_lens: torch.Tensor | None  # [num_decodes] int64: keys each decode attends to, itself included
    decode_max_seq_len: int
    prefills: list[PrefillSpan]
    _decode_masks: dict = field(default_factory=dict, repr=False)

    def decode_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[num_decodes, 1, 1, decode_max_seq_len] bool: which gathered keys each decode may attend to.
        Built once per step and window, shared by every layer."""
        mask = self._decode_masks.get(sliding_window)
        if mask is None:
            key_pos = torch.arange(self.decode_max_seq_len, device=self.decode_seq_lens.device).unsqueeze(0)
            seq_lens = self.decode_seq_lens.unsqueeze(1)
            mask = key_pos < seq_lens
            if sliding_window is not None:
                mask &= key_pos > seq_lens - 1 - sliding_window
            mask = self._decode_masks[sliding_window] = mask[:, None, None, :]
        return mask


_current: AttentionMetadata | None = None


@contextmanager
def set_forward_context(metadata: AttentionMetadata):
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention ran outside set_forward_context(); the model runner sets it for each step")
    return _current
