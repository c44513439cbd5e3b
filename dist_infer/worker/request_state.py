"""What a worker remembers about each request between steps, and the per-step sampling settings built from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_infer.engine.messages import NewRequestData
from dist_infer.layers.sampler import SamplingBatch
from dist_infer.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt, then the output so far
    sampling_params: SamplingParams
    block_ids: list[list[int]]  # per KV-cache group, its block table (0: the null block of a sliding group)
    num_computed_tokens: int
    # The ORIGINAL prompt's length (None: all of ``token_ids`` at creation). A request resent whole (after a
    # migration) keeps it, so that penalties, bad words and min_tokens see the same output as undisturbed.
    num_prompt_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # empty with ignore_eos; held back with stop_token_ids until min_tokens
    # With structured outputs, on the sampling rank: its grammar matcher (a ``RequestGrammar``), made on the
    # first step that samples it (``structured_output.batch_mask``).
    grammar: object | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens is None:
            self.num_prompt_tokens = len(self.token_ids)

    @classmethod
    def from_new(cls, new: NewRequestData) -> CachedRequestState:
        return cls(new.req_id, list(new.token_ids), new.sampling_params, [list(ids) for ids in new.block_ids],
                   new.num_computed_tokens, new.num_prompt_tokens, tuple(new.eos_token_ids))

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def output_tail(self, n: int) -> list[int] | None:
        """The last ``n`` generated tokens, or None when fewer than ``n`` were generated."""
        if n > self.num_output_tokens:
            return None
        return self.token_ids[len(self.token_ids) - n:]


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


def build_sampling_batch(states: list[CachedRequestState], vocab_size: int, device: torch.device,
                         grammar: tuple[torch.Tensor, list[int]] | None = None) -> SamplingBatch:
    """Stacks the settings of the requests sampled this step, row by row in ``states`` order. ``grammar``:
    the structured-output bitmask and its constrained rows (``structured_output.batch_mask``), or None."""
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
    penalty_rows, presence, frequency, counts = _openai_penalties(states, vocab_size, device)
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
        logit_bias=_logit_bias(params, vocab_size, device),
        allowed=_allowed_mask(params, vocab_size, device),
        grammar_bitmask=grammar[0] if grammar is not None else None,
        grammar_rows=grammar[1] if grammar is not None else None,
        blocked=_blocked(states, vocab_size, device),
        penalty_rows=penalty_rows,
        presence_penalty=presence,
        frequency_penalty=frequency,
        output_counts=counts,
    )


def _logit_bias(params: list[SamplingParams], vocab_size: int, device: torch.device):
    """(rows, token ids, biases) of every row's ``logit_bias`` entries, or None."""
    entries = [(i, token, value) for i, p in enumerate(params) for token, value in (p.logit_bias or {}).items()
               if token < vocab_size]
    if not entries:
        return None
    rows, ids, bias = zip(*entries)
    return (torch.tensor(rows, device=device), torch.tensor(ids, device=device),
            torch.tensor(bias, dtype=torch.float32, device=device))


def _allowed_mask(params: list[SamplingParams], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """[B, V] bool: only ``allowed_token_ids`` on the rows that give them, everything elsewhere; or None."""
    restricted = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if not restricted:
        return None
    allowed = torch.ones(len(params), vocab_size, dtype=torch.bool, device=device)
    allowed[torch.tensor(restricted, device=device)] = False
    pairs = [(i, t) for i in restricted for t in params[i].allowed_token_ids if t < vocab_size]
    if pairs:
        table = torch.tensor(pairs, dtype=torch.long, device=device)
        allowed[table[:, 0], table[:, 1]] = True
    return allowed


def _blocked(states: list[CachedRequestState], vocab_size: int, device: torch.device):
    """(rows, token ids) set to -inf this step, or None: EOS and ``stop_token_ids`` of a row with fewer than
    ``min_tokens`` outputs; the last token of each bad word whose other tokens end the output (a one-token word
    always), as vLLM (generated tokens only, not the prompt)."""
    pairs = []
    for i, s in enumerate(states):
        p = s.sampling_params
        if p.min_tokens and s.num_output_tokens < p.min_tokens:
            pairs += [(i, token) for token in {*s.eos_token_ids, *p.stop_token_ids}]
        pairs += [(i, word[-1]) for word in p.bad_words_token_ids if s.output_tail(len(word) - 1) == list(word[:-1])]
    pairs = [(i, token) for i, token in pairs if token < vocab_size]  # the model cannot produce the others
    if not pairs:
        return None
    table = torch.tensor(pairs, dtype=torch.long, device=device)
    return table[:, 0], table[:, 1]


def _openai_penalties(states: list[CachedRequestState], vocab_size: int, device: torch.device):
    """(rows [U], presence [U], frequency [U], counts [U, V]) for the rows with a presence or frequency
    penalty, counting their generated tokens only; all None when no row has one."""
    users = [i for i, s in enumerate(states)
             if s.sampling_params.presence_penalty != 0.0 or s.sampling_params.frequency_penalty != 0.0]
    if not users:
        return None, None, None, None
    outputs = [states[i].token_ids[states[i].num_prompt_tokens:] for i in users]
    longest = max(len(o) for o in outputs)
    padded = torch.full((len(users), longest), vocab_size, dtype=torch.long)  # V: a padding column, cut below
    for row, out in enumerate(outputs):
        padded[row, : len(out)] = torch.tensor(out, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(users), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    params = [states[i].sampling_params for i in users]
    return (torch.tensor(users, device=device),
            torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
            counts[:, :vocab_size])
