"""The synchronous engine: requests in, one ``step()`` at a time, outputs out.

It owns the tokenizer side (input checks, detokenized outputs) and one engine core per data-parallel
replica; a router sends each request to a replica and the outputs of all replicas merge into one stream.
"""

from __future__ import annotations

import itertools
import weakref
from concurrent.futures import FIRST_COMPLETED, wait

from dist_infer.config import EngineConfig
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.dp_router import DataParallelRouter
from dist_infer.engine.engine_core import EngineCore
from dist_infer.engine.input_processor import InputProcessor
from dist_infer.engine.output_processor import OutputProcessor
from dist_infer.engine.request import Request, RequestStatus
from dist_infer.engine.stats import SchedulerStats
from dist_infer.engine.tokenizer import eos_token_ids, load_tokenizer
from dist_infer.executor.factory import create_executor
from dist_infer.outputs import RequestOutput
from dist_infer.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_config = config.model_config
        self.tokenizer = load_tokenizer(model_config)
        self.eos_token_ids = eos_token_ids(model_config, self.tokenizer)
        self.input_processor = InputProcessor(model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.executor = create_executor(config)
        # Workers are stopped when the engine is shut down, collected, or the interpreter exits.
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        try:
            num_blocks = self._size_kv_cache()
        except BaseException:
            self.shutdown()
            raise
        replicas = config.parallel_config.data_parallel_size
        self.cores = [EngineCore(config, num_blocks, d, self.executor) for d in range(replicas)]
        self.router = DataParallelRouter(replicas, config.cache_config.block_size)
        self._owner: dict[str, EngineCore] = {}
        self._failure: BaseException | None = None  # a step that failed leaves the engine unusable
        self._ids = itertools.count()

    def _size_kv_cache(self) -> int:
        model_config, block_size = self.config.model_config, self.config.cache_config.block_size
        num_blocks = self.executor.determine_num_blocks()
        if num_blocks * block_size < model_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks), fewer than one "
                f"sequence of max_model_len={model_config.max_model_len}; lower max_model_len or give the cache "
                f"more memory (kv_cache_memory / gpu_memory_utilization)"
            )
        self.executor.initialize_cache(num_blocks)
        return num_blocks

    @classmethod
    def from_engine_args(cls, **kwargs) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(**kwargs).create_engine_config())

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, priority: int = 0,
                    replica: int | None = None) -> None:
        """Validates and queues one request; a ValueError (nothing queued) if it is malformed or can never fit.
        ``replica`` pins it to one data-parallel replica (health checks), bypassing the router."""
        self._check_usable()
        params = params or SamplingParams()
        processed = self.input_processor.process(prompt, params)
        if request_id in self._owner or any(core.scheduler.is_in_flight(request_id) for core in self.cores):
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, processed.prompt_token_ids, params, self.eos_token_ids,
                          processed.max_tokens, priority)
        if replica is None:
            loads = [core.scheduler.outstanding_work() for core in self.cores]
            replica = self.router.route(processed.prompt_token_ids, loads)
        core = self.cores[replica]
        self.output_processor.add_request(request_id, processed.prompt, processed.prompt_token_ids, params,
                                          request.arrival_time)
        try:
            core.scheduler.add_request(request)
        except BaseException:
            self.output_processor.abort(request_id)
            raise
        self._owner[request_id] = core

    def abort_request(self, request_ids) -> list[RequestOutput]:
        """Stops requests and frees their blocks; returns their final outputs (finish_reason "abort")."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._finish(ids, RequestStatus.FINISHED_ABORTED)
        finals = (self.output_processor.abort(request_id) for request_id in ids)
        return [output for output in finals if output is not None]

    def _finish(self, request_ids, status: RequestStatus) -> None:
        for request_id in request_ids:
            core = self._owner.pop(request_id, None)
            if core is not None:
                core.scheduler.finish_requests([request_id], status)

    def get_stats(self) -> SchedulerStats:
        """Counts and rates right now (running/waiting, KV use, prefix hits, preemptions), summed over replicas."""
        total = SchedulerStats()
        for core in self.cores:
            stats = core.scheduler.get_stats()
            for name, value in vars(stats).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def has_unfinished_requests(self) -> bool:
        return any(core.scheduler.num_unfinished or core.in_flight for core in self.cores)

    def get_num_unfinished_requests(self) -> int:
        return sum(core.scheduler.num_unfinished for core in self.cores)

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the engine stopped after a failed step: {self._failure}") from self._failure

    def step(self) -> list[RequestOutput]:
        """Schedule and start steps on every replica, wait for the first to come back, apply what returned."""
        self._check_usable()
        try:
            core_outputs = self._run_steps()
        except BaseException as e:
            self._failure = e  # requests of the failed step can no longer be accounted for
            raise
        outputs, stopped = self.output_processor.process(core_outputs)
        self._finish(stopped, RequestStatus.FINISHED_STOPPED)
        for output in outputs:
            if output.finished:
                self._owner.pop(output.request_id, None)
        return outputs

    def _run_steps(self):
        for core in self.cores:
            core.fill_pipeline()
        core_outputs = []
        for core in self._wait_for_results():
            core_outputs += core.finish_oldest()
        return core_outputs

    def _wait_for_results(self) -> list[EngineCore]:
        """The cores whose oldest step is done, waiting (bounded) until there is at least one."""
        busy = [core for core in self.cores if core.oldest is not None]
        if not busy:
            return []
        timeout = self.config.parallel_config.worker_timeout_s
        done, _ = wait([core.oldest for core in busy], timeout=timeout, return_when=FIRST_COMPLETED)
        if not done:
            pending = sorted({r for core in busy for r in getattr(core.oldest, "pending_ranks", lambda: [])()})
            raise TimeoutError(f"no step finished within {timeout:.0f}s; waiting on worker rank(s) {pending}")
        return [core for core in busy if core.oldest in done]

    def shutdown(self) -> None:
        self._finalizer()
