"""Typed messages between the engine (scheduler) and the workers. Plain Python, picklable.

Workers keep each request's state; after the first step they receive only what changed (tokens appended,
blocks added, blocks given back), never the whole request again. Block ids come per KV-cache group
(``kv_cache_groups``): a request has one block table per group, and a sliding-window group's table has its
leading entries replaced by the null block (id 0) as they leave every window of the request.

Prompt logprobs: the scheduler names, per step, which prompt positions each request asking for them has scored
(``SchedulerOutput.prompt_logprob_spans``); the last stage's sampling rank returns one ``PromptLogprobs`` chunk
per such request (``ModelRunnerOutput.prompt_logprobs``), and the output processor joins the chunks in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_infer.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen (or must rebuild after being dropped)."""

    req_id: str
    token_ids: list[int]  # every token known so far (the prompt, plus outputs for a resumed request)
    sampling_params: SamplingParams
    block_ids: list[list[int]]  # per group, its whole table (null entries as 0)
    num_computed_tokens: int
    # The original prompt's length, also when ``token_ids`` holds outputs (resent after a migration): the
    # workers count only the tokens after it as generated (penalties, bad words, min_tokens).
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...]  # the request's EOS ids (none with ignore_eos), held back until min_tokens


@dataclass
class CachedRequestData:
    """What changed for a request the workers already hold."""

    req_id: str
    new_token_ids: list[int]  # tokens appended to the sequence since the workers last heard
    new_block_ids: list[list[int]]  # per group, blocks appended to its table; its whole new table when resumed
    num_computed_tokens: int
    resumed_from_preemption: bool = False
    # Per group, how many leading entries of its table are the null block now (blocks given back); () for none.
    num_null: tuple[int, ...] = ()


@dataclass
class SchedulerOutput:
    """One step: which requests run and how many of their tokens each computes."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_req_ids: set[str] = field(default_factory=set)
    # Prompt positions [lo, hi) whose logprobs a request gets from this step's rows (lo >= 1: position 0 has no
    # logprob). Position j is scored from the row of token j - 1, so [lo - 1, hi - 1) lies in this step's chunk.
    prompt_logprob_spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class TokenLogprobs:
    """Log-probabilities at one generated position: the sampled token's and the top-N."""

    sampled_logprob: float
    sampled_rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class PromptLogprobs:
    """Log-probabilities of prompt positions ``start .. start + len(logprobs) - 1`` of one request, from one step:
    per position the actual prompt token's logprob and rank (1 = most likely) and the top-k ids and logprobs
    (k = its ``prompt_logprobs``; empty lists for k = 0), most likely first."""

    start: int
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class ModelRunnerOutput:
    """Tokens sampled this step, for the requests whose sequence reached its end (others computed a chunk), and
    the prompt logprobs of the spans the scheduler asked for."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What one step produced for one request, as the output processor sees it."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # a chunk of prompt logprobs (new_token_ids may be empty)
