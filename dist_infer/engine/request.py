"""A request's state inside the engine (plain Python)."""

from __future__ import annotations

import enum
import time

from dist_infer.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its blocks taken back; recomputed when resumed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """Tokens so far (prompt then output) and how many of them the KV cache already holds.

    There is no prefill or decode mode: each step computes some of the tokens past ``num_computed_tokens``
    (a chunk of the prompt, or the one token sampled last step), and a token is sampled once
    ``num_computed_tokens`` catches up with ``num_tokens``.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: frozenset[int], max_tokens: int, priority: int = 0,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset() if sampling_params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ())
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # How many of ``token_ids`` the workers have been sent.
        self.num_tokens_sent = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.num_migrations = 0  # times it moved to another replica
        # With prompt_logprobs: the first prompt position whose logprobs the engine has not received yet
        # (position 0 has none). It survives preemption and migration, so no position is reported twice.
        self.prompt_logprobs_next = 1

    def reset_for_migration(self, counted: bool = True) -> None:
        """Makes it a new request for another replica, holding every token so far: that replica computes
        prompt + output again (as after a preemption) and samples the next token where this one stopped.
        ``counted``: the move counts toward ``migration_limit`` (after a failure; not at the end of a drain)."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_tokens_sent = 0
        self.num_migrations += counted

    @property
    def sort_key(self) -> tuple[int, float]:
        """Lower runs first: priority value, then arrival."""
        return self.priority, self.arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.max_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self) -> bool:
        """Token-level stop conditions after a new token; sets the status and returns True when finished.
        EOS and ``stop_token_ids`` count only once ``min_tokens`` tokens were generated (the workers keep them
        out before; this guards the engine's side as vLLM does)."""
        last = self.token_ids[-1]
        stops = self.num_output_tokens >= self.sampling_params.min_tokens
        if stops and last in self.eos_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
        elif stops and last in self.stop_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
        elif self.num_output_tokens >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
        return self.status.finished
