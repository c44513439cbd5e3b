"""What ``generate`` and ``chat`` return, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_infer.engine.stats import RequestMetrics


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion. With ``RequestOutputKind.DELTA`` the text, token ids and logprobs are only those new
    since the previous output of the request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per generated token
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    # With ``SamplingParams.prompt_logprobs``: per prompt token, its logprob and the top ones at its position
    # (``None`` for the first token, which nothing predicts).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    error: str | None = None  # why the engine could not finish it (finish_reason "error")


class RequestFailedError(RuntimeError):
    """The engine accepted the request but could not finish it: it outlived its replicas' failures
    (``migration_limit``) or waited longer than ``no_replica_timeout_s`` for a replica. Worth retrying later."""

    def __init__(self, request_id: str, reason: str):
        super().__init__(reason)
        self.request_id = request_id
