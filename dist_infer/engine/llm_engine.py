"""The synchronous engine: requests in, one ``step()`` at a time, outputs out.

It owns the tokenizer side (input checks, detokenized outputs) and the data-parallel replicas
(``ReplicaManager``: one engine core per replica, routing, failures, migration, rebuilds, scaling); the
outputs of all replicas merge into one stream.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from concurrent.futures import ThreadPoolExecutor

from dist_infer.config import EngineConfig
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.input_processor import InputProcessor
from dist_infer.engine.output_processor import OutputProcessor
from dist_infer.engine.replica_manager import ReplicaManager
from dist_infer.engine.request import Request, RequestStatus
from dist_infer.engine.stats import SchedulerStats
from dist_infer.engine.tokenizer import eos_token_ids, load_tokenizer
from dist_infer.executor.factory import ExecutorGroup
from dist_infer.outputs import RequestOutput
from dist_infer.sampling_params import SamplingParams


def _close(executors: ExecutorGroup, holder: list) -> None:
    for manager in holder:
        manager.close()
    executors.shutdown()


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_config = config.model_config
        self.tokenizer = load_tokenizer(model_config)
        self.eos_token_ids = eos_token_ids(model_config, self.tokenizer)
        self.input_processor = InputProcessor(model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.executor = ExecutorGroup(config)
        self._managers: list[ReplicaManager] = []
        # Workers are stopped when the engine is shut down, collected, or the interpreter exits.
        self._finalizer = weakref.finalize(self, _close, self.executor, self._managers)
        self.wakeup = lambda: None  # called (from another thread) when a replica was built or given up
        try:
            self._build_replicas(config.parallel_config.data_parallel_size)
            num_blocks = self._size_kv_cache()
        except BaseException:
            self.shutdown()
            raise
        ref = weakref.ref(self)
        self.replicas = ReplicaManager(config, self.executor, num_blocks,
                                       on_change=lambda: (e := ref()) is not None and e.wakeup())
        self._managers.append(self.replicas)
        self._failure: BaseException | None = None  # the engine can no longer serve
        self._ids = itertools.count()

    def _build_replicas(self, count: int) -> None:
        """Starts every replica's workers: local processes in parallel, Ray replicas one after the other (each
        placement sees where the earlier replicas' workers went)."""
        if (not self.executor.isolated or self.executor.lockstep or count == 1
                or self.config.parallel_config.distributed_executor_backend == "ray"):
            for d in range(count):
                self.executor.build(d)
            return
        with ThreadPoolExecutor(count) as pool:
            for future in [pool.submit(self.executor.build, d) for d in range(count)]:
                future.result()

    def _size_kv_cache(self) -> list[int]:
        """Usable blocks per KV-cache group, allocated on every worker."""
        model_config, block_size = self.config.model_config, self.config.cache_config.block_size
        num_blocks = self.executor.determine_num_blocks()
        # The full-attention group (group 0) holds whole sequences; sliding groups are sized for their windows.
        if num_blocks[0] * block_size < model_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks[0] * block_size} tokens ({num_blocks[0]} blocks), fewer than one "
                f"sequence of max_model_len={model_config.max_model_len}; lower max_model_len or give the cache "
                f"more memory (kv_cache_memory / gpu_memory_utilization)"
            )
        self.executor.initialize_cache(num_blocks)
        return num_blocks

    @classmethod
    def from_engine_args(cls, **kwargs) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(**kwargs).create_engine_config())

    @property
    def cores(self):
        """The engine cores of the replicas that run steps now (serving or draining)."""
        return self.replicas.cores()

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, priority: int = 0,
                    replica: int | None = None) -> None:
        """Validates and queues one request; a ValueError (nothing queued) if it is malformed or can never fit.
        ``replica`` pins it to one serving data-parallel replica (health checks), bypassing the router."""
        self._check_usable()
        params = params or SamplingParams()
        processed = self.input_processor.process(prompt, params)
        if self.replicas.is_known(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if processed.bad_words_token_ids:
            # A copy: the caller's object may serve other requests. Filled here, after any dataclasses.replace
            # (which would reset this init=False field).
            params = copy.copy(params)
            params.bad_words_token_ids = processed.bad_words_token_ids
        request = Request(request_id, processed.prompt_token_ids, params, self.eos_token_ids,
                          processed.max_tokens, priority)
        self.output_processor.add_request(request_id, processed.prompt, processed.prompt_token_ids, params,
                                          request.arrival_time)
        try:
            self.replicas.place(request, replica)
        except BaseException:
            self.output_processor.abort(request_id)
            raise

    def abort_request(self, request_ids) -> list[RequestOutput]:
        """Stops requests and frees their blocks; returns their final outputs (finish_reason "abort")."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._finish(ids, RequestStatus.FINISHED_ABORTED)
        finals = (self.output_processor.abort(request_id) for request_id in ids)
        return [output for output in finals if output is not None]

    def _finish(self, request_ids, status: RequestStatus) -> None:
        for request_id in request_ids:
            self.replicas.finish(request_id, status)

    def get_stats(self) -> SchedulerStats:
        """Counts and rates right now (running/waiting, KV use, prefix hits, preemptions), summed over replicas."""
        total = SchedulerStats()
        for core in self.cores:
            total.add(core.scheduler.get_stats())
        total.num_waiting += len(self.replicas.orphans)
        return total

    def has_unfinished_requests(self) -> bool:
        # A dead engine still has one thing to do: raise from step() so that its callers learn it.
        return self._failure is not None or self.replicas.dead is not None or self.replicas.has_work()

    def get_num_unfinished_requests(self) -> int:
        return self.replicas.num_unfinished()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the engine stopped: {self._failure}") from self._failure

    def step(self) -> list[RequestOutput]:
        """Schedule and start steps on every replica, wait for the first to come back, apply what returned;
        requests that could not be finished (replica failures) end with an error output."""
        self._check_usable()
        try:
            core_outputs = self.replicas.run_steps()
        except BaseException as e:
            self._failure = e  # requests of the failed step can no longer be accounted for
            raise
        outputs, stopped = self.output_processor.process(core_outputs)
        self._finish(stopped, RequestStatus.FINISHED_STOPPED)
        failed, self.replicas.failed_requests = self.replicas.failed_requests, []
        for request_id, reason in failed:
            output = self.output_processor.fail(request_id, reason)
            if output is not None:
                outputs.append(output)
        if self.replicas.dead is not None and not self.replicas.has_work():
            self._failure = self.replicas.dead  # the next step raises it
        return outputs

    def set_num_replicas(self, count: int) -> None:
        """Runs ``count`` data-parallel replicas from now on: new ones start in the background, surplus ones
        drain (they take no new requests, finish what they hold, then stop)."""
        self._check_usable()
        self.replicas.set_target(count)

    def replica_states(self) -> dict[int, str]:
        return self.replicas.states()

    def needs_ticks(self) -> bool:
        """Whether ``step()`` has work even with no request: an autoscaling policy to consult (it scales down
        an idle engine), replicas being built or drained, idle replicas to health-check."""
        return self.replicas.policy is not None or self.replicas.isolated or any(
            state in ("starting", "failed", "draining") for state in self.replicas.states().values())

    def shutdown(self) -> None:
        self._finalizer()
