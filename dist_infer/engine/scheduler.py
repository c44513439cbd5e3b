"""Chooses, each step, which requests run and how many tokens each computes (plain Python).

Running requests go first (each computes the token sampled last step), then waiting requests are admitted
in arrival order while the step's token budget (``max_num_batched_tokens``), the sequence cap
(``max_num_seqs``) and the KV pool allow. A request is admitted only when the pool can hold it at its full
length (prompt + ``max_tokens``) next to the full lengths of the running ones, so a running request never
runs out of blocks.
"""

from __future__ import annotations

from collections import deque

from dist_infer.config import SchedulerConfig
from dist_infer.engine.kv_cache_manager import KVCacheManager
from dist_infer.engine.messages import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from dist_infer.engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int):
        self.config, self.kv, self.max_model_len = config, kv, max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_last_step: set[str] = set()

    # ---- requests in and out -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues ``request``; a ValueError if it could never run."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.max_total_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.max_tokens}) exceeds "
                f"max_model_len={self.max_model_len}"
            )
        if request.num_prompt_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) is longer than "
                f"max_num_batched_tokens={self.config.max_num_batched_tokens}"
            )
        need = self.kv.blocks_for(request.max_total_tokens)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks at full length but the whole cache has {self.kv.num_blocks}; "
                f"lower max_tokens or give the KV cache more memory"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """Ends requests from outside the step (stop string seen, client abort); frees their blocks."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.WAITING:
                self.waiting.remove(request)
            else:
                self.running.remove(request)
            request.status = status
            self._release(request)

    def _release(self, request: Request) -> None:
        self.kv.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_since_last_step.add(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_since_last_step)
        self._finished_since_last_step = set()
        budget = self.config.max_num_batched_tokens

        for request in self.running:
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if n <= 0:
                continue
            new_blocks = self.kv.allocate_slots(request.request_id, request.num_computed_tokens + n)
            if new_blocks is None:  # cannot happen: admission reserved the full length
                raise RuntimeError(f"KV pool exhausted for running request {request.request_id}")
            out.cached_requests.append(CachedRequestData(
                request.request_id, request.token_ids[request.num_tokens_sent:], new_blocks,
                request.num_computed_tokens))
            request.num_tokens_sent = request.num_tokens
            out.num_scheduled_tokens[request.request_id] = n
            budget -= n

        reserved = sum(self.kv.blocks_for(r.max_total_tokens) - self.kv.num_held(r.request_id) for r in self.running)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = request.num_tokens - request.num_computed_tokens
            need = self.kv.blocks_for(request.max_total_tokens)
            if n > budget or need > self.kv.num_free_blocks - reserved:
                break
            self.waiting.popleft()
            blocks = self.kv.allocate_slots(request.request_id, request.num_tokens)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            reserved += need - len(blocks)
            out.new_requests.append(NewRequestData(
                request.request_id, list(request.token_ids), request.sampling_params, list(blocks),
                request.num_computed_tokens))
            request.num_tokens_sent = request.num_tokens
            out.num_scheduled_tokens[request.request_id] = n
            budget -= n
        if not out.num_scheduled_tokens:
            # Nothing runs, so the workers will not see this output; tell them about finished ones next time.
            self._finished_since_last_step |= out.finished_req_ids
            out.finished_req_ids = set()
        return out

    def update_from_output(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advances each scheduled request by what the model computed and sampled."""
        outputs = []
        for request_id, n in scheduled.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            request.num_computed_tokens += n
            token = result.sampled_token_ids.get(request_id)
            if token is None:
                continue
            request.append_token(token)
            finished = request.check_stop()
            if not finished and request.num_tokens >= self.max_model_len:
                request.status, finished = RequestStatus.FINISHED_LENGTH, True
            logprobs = result.logprobs.get(request_id)
            outputs.append(EngineCoreOutput(
                request_id, [token], [logprobs] if logprobs is not None else [],
                request.status.value if finished else None, request.stop_reason))
            if finished:
                self.running.remove(request)
                self._release(request)
        return outputs
