"""Chooses, each step, which requests run and how many of their tokens each computes (plain Python).

There is no prefill or decode phase: every request computes some of its tokens past
``num_computed_tokens`` -- the one token sampled last step, or a chunk of its prompt -- within a per-step
budget of ``max_num_batched_tokens`` and at most ``max_num_seqs`` running requests.

Order within a step: running decodes first (so they keep flowing), then running prompt chunks, then waiting
requests by (priority, arrival). A prompt chunk takes at most ``long_prefill_token_threshold`` tokens, which
leaves room in each step for newly arrived requests. A waiting request starts from the longest prefix the
KV cache already holds. When a running request needs a block and none is free, the running request with
the lowest priority (highest value) that arrived last is preempted: its blocks go back to the pool and it
waits to be recomputed later; no new request is admitted in that step.

Prompt logprobs (``SamplingParams.prompt_logprobs``): position ``j`` of a prompt is scored from the hidden
state of token ``j - 1``, so those tokens must be computed, not taken from the prefix cache. Such a request
looks up at most the prefix it has already been scored on (nothing at first admission) -- its blocks still
fill the cache for others. Each step names the positions its chunk scores (``prompt_logprob_spans``), and
``Request.prompt_logprobs_next`` advances only when they come back, so a prompt recomputed after a preemption
or a migration (whose "prompt" then holds its outputs too) is never reported twice, nor past its original end.

KV-cache groups (``kv_cache_groups``): a model mixing full-attention and sliding-window layers has one block table
per group and request; a request runs only if every group has room, and preemption and finishing free every
group. A sliding group's blocks that every window of a request has left go back to the pool when the step that
advanced it returns (the workers hear of them with its next step, ``CachedRequestData.num_null``).

With pipeline parallelism several steps are in flight at once; a request scheduled in a step that has not
come back yet sits out (and cannot be preempted) until it does, so in-flight steps hold disjoint requests.
"""

from __future__ import annotations

import heapq
import itertools

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
from dist_infer.engine.stats import SchedulerStats


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int):
        self.config, self.kv, self.max_model_len = config, kv, max_model_len
        self.waiting: list[tuple] = []  # heap of (priority, arrival, seq, request)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats(kv_blocks_total=kv.num_blocks, kv_group_blocks_total=kv.group_num_blocks)
        self._seq = itertools.count()
        self._finished_since_last_step: set[str] = set()
        self._in_flight: set[str] = set()  # requests of steps not yet returned

    # ---- requests in and out -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues ``request``; a ValueError if it could never run."""
        if request.request_id in self.requests or request.request_id in self._in_flight:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.max_total_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.max_tokens}) exceeds "
                f"max_model_len={self.max_model_len}"
            )
        max_chunk = min(self.config.long_prefill_token_threshold or self.config.max_num_batched_tokens,
                        self.config.max_num_batched_tokens)
        held = self.kv.max_blocks_held(request.max_total_tokens, max_chunk)
        for group, (need, have) in enumerate(zip(held, self.kv.group_num_blocks)):
            if need > have:
                window = self.kv.groups.windows[group]
                where = "the whole cache" if window is None else f"the sliding-window ({window}) group"
                raise ValueError(
                    f"request needs {need} KV blocks at full length but {where} has {have}; "
                    f"lower max_tokens or give the KV cache more memory"
                )
        self.requests[request.request_id] = request
        self.stats.requests_added += 1
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        heapq.heappush(self.waiting, (*request.sort_key, next(self._seq), request))

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """Ends requests from outside the step (stop string seen, client abort); frees their blocks."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting = [entry for entry in self.waiting if entry[-1] is not request]
                heapq.heapify(self.waiting)
            request.status = status
            self._release(request)

    def _release(self, request: Request) -> None:
        self.kv.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_since_last_step.add(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        # It may have been scheduled earlier in this very step: blocks past what was computed before it are
        # cached already but will not be written now.
        self.kv.free(request.request_id, num_computed_tokens=request.num_computed_tokens)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.stats.num_preemptions += 1
        self._push_waiting(request)

    def take_all(self) -> list[Request]:
        """Removes and returns every unfinished request, oldest first, without touching the KV cache (the
        replica is gone, its cache with it; or its requests move elsewhere and its blocks are freed here)."""
        requests = sorted(self.requests.values(), key=lambda r: r.sort_key)
        for request in requests:
            self.kv.free(request.request_id)
        self.requests, self.running, self.waiting = {}, [], []
        self._in_flight.clear()
        return requests

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def is_in_flight(self, request_id: str) -> bool:
        """True while a step that holds the request has not come back (even if it was aborted since)."""
        return request_id in self._in_flight

    def outstanding_work(self) -> int:
        """Tokens still to compute or generate for every unfinished request (for load balancing)."""
        return sum(r.max_total_tokens - r.num_computed_tokens for r in self.requests.values())

    def get_stats(self) -> SchedulerStats:
        stats = self.stats
        stats.num_running, stats.num_waiting = len(self.running), len(self.waiting)
        stats.kv_blocks_free, stats.kv_group_blocks_free = self.kv.num_free_blocks, self.kv.group_free_blocks
        return SchedulerStats(**vars(stats))

    # ---- one step ------------------------------------------------------------------------------------
    def _chunk(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining > 1 and self.config.long_prefill_token_threshold:
            remaining = min(remaining, self.config.long_prefill_token_threshold)
        return min(remaining, budget)

    def schedule(self, max_requests: int | None = None) -> SchedulerOutput:
        """``max_requests`` caps the requests of this step (a pipeline's micro-batch)."""
        budget = self.config.max_num_batched_tokens
        seats = max_requests if max_requests is not None else self.config.max_num_seqs
        scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[list[int]]] = {}  # per request, per KV-cache group
        preempted = False

        # Decodes (one token left) before prompt chunks; sorted() is stable, so arrival order holds within each.
        for request in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0 or len(scheduled) >= seats:
                break
            if request.status != RequestStatus.RUNNING or request.request_id in self._in_flight:
                continue  # preempted earlier in this loop, or still in a step that has not returned
            n = self._chunk(request, budget)
            if n <= 0:
                continue
            while (blocks := self.kv.allocate_slots(request.request_id, request.token_ids,
                                                    request.num_computed_tokens, n)) is None:
                victim = max((r for r in self.running if r.request_id not in self._in_flight), key=lambda r: r.sort_key)
                self._preempt(victim)
                preempted = True
                if victim.request_id in scheduled:
                    budget += scheduled.pop(victim.request_id)
                    del new_blocks[victim.request_id]
                if victim is request:
                    break
            if blocks is None:
                continue
            scheduled[request.request_id], new_blocks[request.request_id] = n, blocks
            budget -= n

        admitted: list[Request] = []
        while (not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(scheduled) < seats):
            request = self.waiting[0][-1]
            hits, num_hit = self.kv.get_computed_blocks(request.request_id, request.token_ids,
                                                        self._reusable_prefix(request))
            request.num_computed_tokens = num_hit
            n = self._chunk(request, budget)
            blocks = self.kv.allocate_slots(request.request_id, request.token_ids, num_hit, n, hits)
            if blocks is None:
                request.num_computed_tokens = 0
                break
            heapq.heappop(self.waiting)
            self.stats.prefix_cache_queries += request.num_tokens
            self.stats.prefix_cache_hits += num_hit
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit
            admitted.append(request)
            self.running.append(request)
            scheduled[request.request_id], new_blocks[request.request_id] = n, blocks
            budget -= n

        out = self._build_output(scheduled, new_blocks, admitted)
        self._in_flight.update(scheduled)
        if not out.num_scheduled_tokens:
            # Nothing runs, so the workers will not see this output; tell them about finished ones next time.
            self._finished_since_last_step |= out.finished_req_ids
            out.finished_req_ids = set()
        return out

    @staticmethod
    def _reusable_prefix(request: Request) -> int | None:
        """How many leading tokens may come from the prefix cache (None: any): with prompt logprobs still owed
        from position p on, only tokens before p - 1, whose hidden states no owed position needs."""
        if request.sampling_params.prompt_logprobs is None or request.prompt_logprobs_next >= request.num_prompt_tokens:
            return None
        return request.prompt_logprobs_next - 1

    @staticmethod
    def _prompt_logprob_span(request: Request, n: int) -> tuple[int, int] | None:
        """The prompt positions scored by the ``n`` tokens from ``num_computed_tokens`` on, or None."""
        if request.sampling_params.prompt_logprobs is None:
            return None
        start = request.num_computed_tokens
        lo = max(request.prompt_logprobs_next, start + 1)
        hi = min(start + n + 1, request.num_prompt_tokens)
        return (lo, hi) if lo < hi else None

    def _build_output(self, scheduled: dict[str, int], new_blocks: dict[str, list[list[int]]],
                      admitted: list[Request]) -> SchedulerOutput:
        out = SchedulerOutput(num_scheduled_tokens=scheduled, finished_req_ids=self._finished_since_last_step)
        self._finished_since_last_step = set()
        admitted_ids = {r.request_id for r in admitted}
        for request_id, n in scheduled.items():
            request = self.requests[request_id]
            span = self._prompt_logprob_span(request, n)
            if span is not None:
                out.prompt_logprob_spans[request_id] = span
            if request.status == RequestStatus.WAITING:
                out.new_requests.append(NewRequestData(
                    request_id, list(request.token_ids), request.sampling_params, new_blocks[request_id],
                    request.num_computed_tokens, request.num_prompt_tokens, tuple(sorted(request.eos_token_ids))))
            else:
                resumed = request_id in admitted_ids  # a preempted request back from the waiting queue
                out.cached_requests.append(CachedRequestData(
                    request_id, request.token_ids[request.num_tokens_sent:], new_blocks[request_id],
                    request.num_computed_tokens, resumed_from_preemption=resumed,
                    num_null=self.kv.num_null(request_id)))
            request.status = RequestStatus.RUNNING
            request.num_tokens_sent = request.num_tokens
        return out

    def update_from_output(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advances each scheduled request by what the model computed and sampled."""
        outputs = []
        stats = self.stats
        stats.num_steps += 1
        stats.last_step_tokens = scheduled.total_num_scheduled_tokens
        for request_id, n in scheduled.num_scheduled_tokens.items():
            self._in_flight.discard(request_id)
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            start = request.num_computed_tokens
            stats.prompt_tokens_computed += max(0, min(start + n, request.num_prompt_tokens) - start)
            request.num_computed_tokens += n
            self.kv.release_out_of_window(request_id, request.num_computed_tokens)
            prompt_logprobs = result.prompt_logprobs.get(request_id)
            if prompt_logprobs is not None:
                request.prompt_logprobs_next = scheduled.prompt_logprob_spans[request_id][1]
            token = result.sampled_token_ids.get(request_id)
            if token is None:
                if prompt_logprobs is not None:  # a prompt chunk: its logprobs go out now, the token later
                    outputs.append(EngineCoreOutput(request_id, [], num_cached_tokens=request.num_cached_tokens,
                                                    prompt_logprobs=prompt_logprobs))
                continue
            stats.generation_tokens += 1
            request.append_token(token)
            finished = request.check_stop()
            if not finished and request.num_tokens >= self.max_model_len:
                request.status, finished = RequestStatus.FINISHED_LENGTH, True
            logprobs = result.logprobs.get(request_id)
            outputs.append(EngineCoreOutput(
                request_id, [token], [logprobs] if logprobs is not None else [],
                request.status.value if finished else None, request.stop_reason, request.num_cached_tokens,
                prompt_logprobs))
            if finished:
                self.running.remove(request)
                self._release(request)
        return outputs
