"""What a worker remembers about each request between steps, and the per-step sampling settings built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_infer.layers.sampler import SamplingBatch
from dist_infer.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = field(default=None, repr=False)


def build_sampling_batch(states: list[CachedRequestState], vocab_size: int, device: torch.device) -> SamplingBatch:
    """Stacks the settings of the requests sampled this step, row by row in ``states`` order."""
    params = [s.sampling_params for s in states]
    greedy = [p.greedy for p in params]
    all_greedy = all(greedy)
    top_k = top_p = min_p = None
    if not all_greedy:
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    penalty = seen = None
    if any(p.repetition_penalty != 1.0 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
        longest = max(len(s.token_ids) for s in states)
        seen = torch.full((len(states), longest), vocab_size, dtype=torch.long)
        for i, s in enumerate(states):
            seen[i, : len(s.token_ids)] = torch.tensor(s.token_ids)
        seen = seen.to(device)
    logprobs = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingBatch(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        greedy=torch.tensor(greedy, device=device),
        all_greedy=all_greedy,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=penalty,
        seen_tokens=seen,
        generators=[s.generator for s in states],
        max_num_logprobs=max(logprobs) if logprobs else None,
    )
