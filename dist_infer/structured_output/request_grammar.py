"""One request's position in its grammar: an xgrammar ``GrammarMatcher`` that has consumed the output so far.

The matcher is kept in step with the request's output *lazily*: before its next mask is filled it consumes
whatever output tokens it has not seen (``sync``). The token sampled at step t reaches the worker as an input of
step t + 1, so this advances the matcher by the sampled token on the background thread, overlapped with the
forward, and needs no special case for a request that arrives again as a new one after a preemption or a
migration: its ``token_ids`` hold the output so far (after ``num_prompt_tokens``), which a fresh matcher
replays.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class RequestGrammar:
    def __init__(self, compiled, stop_token_ids: tuple[int, ...], req_id: str = ""):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=False)
        self.stop_token_ids = stop_token_ids
        self.req_id = req_id
        self.num_consumed = 0  # output tokens consumed so far
        self.failed = False  # a token the grammar does not allow was generated (cannot happen under the mask)

    def sync(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        """Consumes the output tokens (``token_ids`` after ``num_prompt_tokens``) not consumed yet: usually the
        one sampled last step (the slice is of those only, not of the whole output, every step)."""
        for token in token_ids[num_prompt_tokens + self.num_consumed:]:
            if self.failed or self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(token):
                logger.warning("request %s: token %d is outside its grammar; only EOS is allowed from here",
                               self.req_id, token)
                self.failed = True
        self.num_consumed = len(token_ids) - num_prompt_tokens

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into ``bitmask[row]`` (int32 words, bit ``t % 32`` of word ``t // 32``)."""
        if self.failed or self.matcher.is_terminated():
            only_tokens(bitmask, row, self.stop_token_ids)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)


def only_tokens(bitmask: torch.Tensor, row: int, token_ids) -> None:
    """``bitmask[row]`` allows exactly ``token_ids`` (no token at all when empty: then all are allowed instead,
    since a row with nothing allowed cannot be sampled; the request then runs to its length limit)."""
    ids = [t for t in token_ids if t < bitmask.shape[1] * 32]
    if not ids:
        bitmask[row] = -1
        return
    bitmask[row] = 0
    for t in ids:
        word = int(bitmask[row, t >> 5]) & 0xFFFFFFFF
        word |= 1 << (t & 31)
        bitmask[row, t >> 5] = word - (1 << 32) if word >= 1 << 31 else word
