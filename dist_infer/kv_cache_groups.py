"""KV-cache groups: layers that share block tables because they attend the same way (plain Python).

A model whose layers all attend alike (full attention, or one sliding window on every layer, as Mistral) has one
group and keeps one block table per request, as before. A model mixing full-attention layers with sliding-window
layers (Gemma 2/3, Qwen2 with ``layer_types``) has one group per kind: group 0 the full-attention layers, then one
group per distinct window ``w`` (ascending). Each group has its own blocks and its own block table per request.
A sliding group's query at position ``m`` reads keys at positions ``> m - w`` only, so once a request has computed
``c`` tokens, its sliding blocks lying wholly before position ``c - w`` are never read again and go back to the
pool (``first_kept_block``); their table entries then point at the group's *null block* (block 0, never handed
out, never written, zero-filled), so a table index still means a position and a masked gather stays harmless.

Blocks are given back as soon as a step that advanced the request returns, and before the request's next blocks
are taken, so between steps a request holds at most ``ceil(w / block_size) + 1`` sliding blocks, and while a chunk
of ``n`` tokens runs at most ``ceil((w + n) / block_size) + 1``.

Budget rule (``KVCacheGroups.sliding_blocks``, applied by ``Worker.determine_num_blocks``): a sliding group gets
what ``max_num_seqs`` requests hold at once -- ``max_num_seqs * (ceil(w / block_size) + 3)`` blocks for their
windows, their chunks' block-boundary slack and the block the window starts in, plus
``ceil(max_num_batched_tokens / block_size)`` per step in flight for the chunks -- never more than every sequence at
full length would use, plus its null block; the full-attention group gets the rest of the budget. (Should that
leave the full group fewer blocks than the layout without groups, every group gets that layout's count instead.)
A shortfall is never wrong, only slower: the scheduler preempts as for any full pool.
"""

from __future__ import annotations

from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sliding_window_for(config, layer_idx: int) -> int | None:
    """The attention window of layer ``layer_idx`` of a transformers config (None: full attention): its
    ``sliding_window`` on the layers ``layer_types`` calls "sliding_attention", on every layer without it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


@dataclass(frozen=True)
class KVCacheGroups:
    """``windows[g]``: group ``g``'s sliding window, None for full attention (one group: today's layout, where
    even a window on every layer keeps whole contexts)."""

    windows: tuple[int | None, ...] = (None,)

    @classmethod
    def from_hf_config(cls, hf_config) -> KVCacheGroups:
        layer_windows = {sliding_window_for(hf_config, i) for i in range(hf_config.num_hidden_layers)}
        if len(layer_windows) <= 1:
            return cls()
        return cls((None, *sorted(w for w in layer_windows if w is not None)))

    def __len__(self) -> int:
        return len(self.windows)

    def group_of(self, sliding_window: int | None) -> int:
        """The group of a layer with this window."""
        return self.windows.index(sliding_window) if len(self.windows) > 1 else 0

    def is_sliding(self, group: int) -> bool:
        return self.windows[group] is not None

    def first_kept_block(self, group: int, num_computed: int, block_size: int) -> int:
        """The first block of a request with ``num_computed`` tokens computed that its next queries (positions
        ``>= num_computed``) may read in ``group``: blocks wholly before position ``num_computed - w`` are not."""
        window = self.windows[group]
        return 0 if window is None else max(0, num_computed - window) // block_size

    def max_blocks_held(self, group: int, num_tokens: int, max_chunk: int, block_size: int) -> int:
        """Most blocks one request of ``num_tokens`` tokens holds at once in ``group``, computing at most
        ``max_chunk`` tokens a step: all of them for full attention; for a window ``w`` the blocks from position
        ``c - w`` to ``c + chunk`` (one more for where the window starts within its block)."""
        full = cdiv(num_tokens, block_size)
        window = self.windows[group]
        return full if window is None else min(full, cdiv(window + max_chunk, block_size) + 1)

    def sliding_blocks(self, group: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                       block_size: int, steps_in_flight: int = 1) -> int:
        """Usable blocks a sliding group gets (the module's budget rule); the null block comes on top."""
        ceiling = max_num_seqs * cdiv(max_model_len, block_size)
        windows = max_num_seqs * (cdiv(self.windows[group], block_size) + 3)
        return min(windows + steps_in_flight * cdiv(max_num_batched_tokens, block_size), ceiling)

    def null_blocks(self, group: int) -> int:
        """Blocks a group's cache tensor holds beyond its usable ones: the null block of a sliding group."""
        return 1 if self.is_sliding(group) else 0
