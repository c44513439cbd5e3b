"""Turns last-position logits into next tokens, per request settings, batched.

For a row with logits ``z`` (fp32, [V]):
1. repetition penalty ``p``: for tokens already seen, ``z_t <- z_t / p`` if ``z_t > 0`` else ``z_t * p``;
2. greedy rows take ``argmax z``; the others use ``z / temperature``;
3. top-k keeps the ``k`` largest, top-p the smallest prefix of the sorted distribution whose mass reaches
   ``p`` (the first token always stays), min-p the tokens with ``prob >= min_p * max prob``;
4. a token is drawn from the renormalized distribution ``pi`` by the exponential race
   ``argmax_t pi_t / E_t``, ``E_t ~ Exp(1)``, which picks ``t`` with probability ``pi_t``.

The noise ``E`` of a seeded request is drawn in vocabulary order from a generator seeded by the request's
seed and the position being sampled (``request_state.position_seed``), so a seeded request's tokens depend
on neither the other rows of its batch nor the path it took (preemption, another replica after a failure). Log-probabilities are those of the
model's raw distribution ``log_softmax(z)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingBatch:
    """Per-row settings for one step's logits [B, V]. Optional tensors are None when no row uses them."""

    temperature: torch.Tensor  # [B] float; 0 for greedy rows
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] long; V where disabled
    top_p: torch.Tensor | None  # [B] float
    min_p: torch.Tensor | None  # [B] float
    repetition_penalty: torch.Tensor | None  # [B] float
    seen_tokens: torch.Tensor | None  # [B, L] long, padded with V
    generators: list[torch.Generator | None]
    max_num_logprobs: int | None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    topk_ids: torch.Tensor | None = None  # [B, N]
    topk_logprobs: torch.Tensor | None = None  # [B, N]
    sampled_logprobs: torch.Tensor | None = None  # [B]
    sampled_ranks: torch.Tensor | None = None  # [B], 1 = most likely


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None
        if batch.repetition_penalty is not None:
            logits = self._apply_repetition_penalty(logits, batch)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, batch)
        out = SamplerOutput(token_ids=tokens)
        if raw_logprobs is not None:
            self._gather_logprobs(raw_logprobs, tokens, batch.max_num_logprobs, out)
        return out

    @staticmethod
    def _apply_repetition_penalty(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        B, V = logits.shape
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, batch.seen_tokens, True)
        seen = seen[:, :V]
        penalty = batch.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(seen, penalized, logits)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        temperature = torch.where(batch.greedy, 1.0, batch.temperature).unsqueeze(1)
        scaled = logits / temperature
        keep = self._filter(scaled, batch)
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(batch.generators) if g is None]
        if len(unseeded) == len(batch.generators):
            noise.exponential_()
        else:
            for i, g in enumerate(batch.generators):
                if g is not None:
                    noise[i].exponential_(generator=g)
            if unseeded:
                rows = torch.tensor(unseeded, device=noise.device)
                noise[rows] = torch.empty(len(unseeded), noise.shape[1], device=noise.device).exponential_()
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.greedy, greedy_tokens, sampled)

    @staticmethod
    def _filter(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Boolean [B, V] of the tokens top-k, top-p and min-p leave in play."""
        keep = torch.ones_like(scaled, dtype=torch.bool)
        if batch.top_k is not None or batch.top_p is not None:
            sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
            ranks = torch.arange(scaled.shape[1], device=scaled.device).unsqueeze(0)
            keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
            if batch.top_k is not None:
                keep_sorted &= ranks < batch.top_k.unsqueeze(1)
            if batch.top_p is not None:
                probs = torch.softmax(sorted_logits.masked_fill(~keep_sorted, float("-inf")), dim=-1)
                mass_before = probs.cumsum(dim=-1) - probs
                keep_sorted &= (mass_before < batch.top_p.unsqueeze(1)) | (ranks == 0)
            keep = torch.zeros_like(keep).scatter_(1, order, keep_sorted)
        if batch.min_p is not None:
            probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
            threshold = batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            keep &= probs >= threshold
        return keep

    @staticmethod
    def _gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, n: int, out: SamplerOutput) -> None:
        sampled = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
        out.sampled_logprobs = sampled
        out.sampled_ranks = (raw > sampled.unsqueeze(1)).sum(dim=-1) + 1
        if n > 0:
            out.topk_logprobs, out.topk_ids = raw.topk(n, dim=-1)
