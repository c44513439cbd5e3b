"""The synchronous engine: requests in, one ``step()`` at a time, outputs out."""

from __future__ import annotations

import itertools

from dist_infer.config import EngineConfig
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.input_processor import InputProcessor
from dist_infer.engine.kv_cache_manager import KVCacheManager
from dist_infer.engine.output_processor import OutputProcessor
from dist_infer.engine.request import Request, RequestStatus
from dist_infer.engine.scheduler import Scheduler
from dist_infer.engine.stats import SchedulerStats
from dist_infer.engine.tokenizer import eos_token_ids, load_tokenizer
from dist_infer.outputs import RequestOutput
from dist_infer.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from dist_infer.executor.uniproc import UniProcExecutor

        self.config = config
        model_config = config.model_config
        self.tokenizer = load_tokenizer(model_config)
        self.eos_token_ids = eos_token_ids(model_config, self.tokenizer)
        self.input_processor = InputProcessor(model_config, self.tokenizer)
        self.executor = UniProcExecutor(config)
        num_blocks = self.executor.determine_num_blocks()
        block_size = config.cache_config.block_size
        if num_blocks * block_size < model_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks), fewer than one "
                f"sequence of max_model_len={model_config.max_model_len}; lower max_model_len or give the cache "
                f"more memory (kv_cache_memory / gpu_memory_utilization)"
            )
        self.executor.initialize_cache(num_blocks)
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, config.cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, self.kv_cache_manager, model_config.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, **kwargs) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(**kwargs).create_engine_config())

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, priority: int = 0) -> None:
        """Validates and queues one request; a ValueError (nothing queued) if it is malformed or can never fit."""
        params = params or SamplingParams()
        processed = self.input_processor.process(prompt, params)
        request = Request(request_id, processed.prompt_token_ids, params, self.eos_token_ids,
                          processed.max_tokens, priority)
        self.scheduler.add_request(request)
        self.output_processor.add_request(request_id, processed.prompt, processed.prompt_token_ids, params,
                                          request.arrival_time)

    def abort_request(self, request_ids) -> list[RequestOutput]:
        """Stops requests and frees their blocks; returns their final outputs (finish_reason "abort")."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        finals = (self.output_processor.abort(request_id) for request_id in ids)
        return [output for output in finals if output is not None]

    def get_stats(self) -> SchedulerStats:
        """Counts and rates of the engine right now (running/waiting, KV use, prefix hits, preemptions)."""
        return self.scheduler.get_stats()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update: one forward pass over the scheduled tokens of every running request."""
        scheduled = self.scheduler.schedule()
        if not scheduled.num_scheduled_tokens:
            return []
        result = self.executor.execute_model(scheduled)
        outputs, stopped = self.output_processor.process(self.scheduler.update_from_output(scheduled, result))
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
