"""What a worker remembers about each request between steps, and the per-step sampling settings built from it."""

from __future__ import annotations

from dataclasses import dataclass

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


_MASK64 = 2**64 - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of the noise that samples the token at ``position`` (its index in prompt + output) of a request
    seeded with ``seed``: a splitmix64 mix of both, so neighbouring positions and seeds draw unrelated noise.

    The noise depends on nothing else (not on how many tokens were sampled before, on which worker or
    replica, after a preemption or after a migration): a request moved to another replica with its tokens so
    far draws exactly the noise it would have drawn where it was."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def position_generator(state: CachedRequestState, device: torch.device) -> torch.Generator | None:
    """The generator for the token a seeded request samples now (None for an unseeded one)."""
    seed = state.sampling_params.seed
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(position_seed(seed % 2**64, len(state.token_ids)))


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
        generators=[position_generator(s, device) for s in states],
        max_num_logprobs=max(logprobs) if logprobs else None,
    )
