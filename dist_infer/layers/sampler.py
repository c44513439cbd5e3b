"""Turns last-position logits into next tokens, per request settings, batched.

For a row with logits ``z`` (fp32, [V]), in this order (vLLM's):
1. constraints: ``z_t += logit_bias_t``; tokens outside the row's ``allowed`` mask or its structured-output
   grammar's bitmask (``grammar_bitmask``: bit ``t % 32`` of word ``t // 32``), and the ``blocked``
   (row, token) pairs (the last token of a bad word whose other tokens were just generated; EOS and
   ``stop_token_ids`` while fewer than ``min_tokens`` tokens were generated) get ``z_t = -inf``;
2. penalties: repetition ``p`` for tokens already seen (prompt or output), ``z_t <- z_t / p`` if ``z_t > 0``
   else ``z_t * p``; then OpenAI's ``z_t <- z_t - frequency * c_t - presence * [c_t > 0]`` with ``c_t`` the
   count of ``t`` among the generated tokens only (not the prompt);
3. greedy rows take ``argmax z`` of these processed logits; the others use ``z / temperature``;
4. top-k keeps the ``k`` largest, top-p the smallest prefix of the sorted distribution whose mass reaches
   ``p`` (the first token always stays), min-p the tokens with ``prob >= min_p * max prob``;
5. a token is drawn from the renormalized distribution ``pi`` by the exponential race
   ``argmax_t pi_t / E_t``, ``E_t ~ Exp(1)``, which picks ``t`` with probability ``pi_t``.

The noise ``E`` of a seeded request is drawn in vocabulary order from a generator seeded by the request's
seed and the position being sampled (``request_state.position_seed``), so a seeded request's tokens depend
on neither the other rows of its batch nor the path it took (preemption, another replica after a failure).

Log-probabilities are those of the model's raw distribution ``log_softmax(z)``, before any of steps 1-4
(as vLLM's default ``raw_logprobs``): a biased, masked or penalized token still reports what the model gave it.
A row whose every token is masked (say ``allowed_token_ids`` that ``min_tokens`` all holds back) has no valid
choice and gets an arbitrary token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_infer.structured_output.apply import apply_grammar_bitmask


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
    # Constraints (step 1), None when no row has any.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows [N], token ids [N], biases [N]
    # The generic allowed-token hook: True where the row may sample the token, rows without a restriction all
    # True. ``allowed_token_ids`` fills it (structured-output grammars have their packed ``grammar_bitmask``).
    allowed: torch.Tensor | None = None  # [B, V] bool
    blocked: tuple[torch.Tensor, torch.Tensor] | None = None  # rows [M], token ids [M]: set to -inf
    # Structured outputs: the grammars' allowed tokens as an int32 bitmask [B, ceil(V / 32)], applied (by
    # xgrammar's kernel, cheaper on a CPU than unpacking it into ``allowed``) to ``grammar_rows`` only.
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: list[int] | None = None
    # OpenAI penalties (step 2), only for the U rows that have one: their row indices, settings and counts.
    penalty_rows: torch.Tensor | None = None  # [U] long
    presence_penalty: torch.Tensor | None = None  # [U] float
    frequency_penalty: torch.Tensor | None = None  # [U] float
    output_counts: torch.Tensor | None = None  # [U, V] float: occurrences of each token in the row's output


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
        logits = self.process_logits(logits, batch)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, batch)
        out = SamplerOutput(token_ids=tokens)
        if raw_logprobs is not None:
            self._gather_logprobs(raw_logprobs, tokens, batch.max_num_logprobs, out)
        return out

    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Steps 1 and 2 (constraints, then penalties): the logits [B, V] that greedy and sampled rows alike
        choose from. The input is left as it was."""
        logits = self._apply_constraints(logits, batch)
        if batch.repetition_penalty is not None:
            logits = self._apply_repetition_penalty(logits, batch)
        if batch.penalty_rows is not None:
            logits = self._apply_openai_penalties(logits, batch)
        return logits

    @staticmethod
    def _apply_constraints(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if (batch.logit_bias is None and batch.allowed is None and batch.blocked is None
                and batch.grammar_bitmask is None):
            return logits
        logits = logits.clone()  # the caller's logits stay the model's
        if batch.logit_bias is not None:
            rows, ids, bias = batch.logit_bias
            logits.index_put_((rows, ids), bias.to(logits.dtype), accumulate=True)
        if batch.allowed is not None:
            logits.masked_fill_(~batch.allowed, float("-inf"))
        if batch.grammar_bitmask is not None:
            apply_grammar_bitmask(logits, batch.grammar_bitmask, batch.grammar_rows)
        if batch.blocked is not None:
            rows, ids = batch.blocked
            logits.index_put_((rows, ids), torch.tensor(float("-inf"), device=logits.device))
        return logits

    @staticmethod
    def _apply_openai_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """``z - frequency * count - presence * [count > 0]`` on the penalized rows only."""
        rows, counts = batch.penalty_rows, batch.output_counts
        penalized = (logits[rows] - batch.frequency_penalty.unsqueeze(1) * counts
                     - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(counts.dtype))
        return logits.index_copy(0, rows, penalized)

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
