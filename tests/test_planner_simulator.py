"""The simulator's scheduling equals the real engine's, step by step (batches, preemptions, prefix hits), and its
clock follows the pipeline and the shared cores as documented."""

from __future__ import annotations

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.llm_engine import LLMEngine
from dist_infer.planner.events import EventQueue, SharedHost
from dist_infer.planner.simulator import simulate
from dist_infer.planner.workload import WorkItem, Workload
from dist_infer.sampling_params import SamplingParams


class UnitCost:
    """Every stage of every step takes one second; nothing else costs anything."""

    source, host_cores = "unit", None

    def stage_seconds(self, shape, layout, stage):
        return 1.0

    def stage_comm_seconds(self, shape, layout, stage):
        return 0.0

    def stage_load(self, shape, layout):
        return 1.0, 1, 1.0

    def comm_stretch(self, layout, computing):
        return 1.0

    def p2p_seconds(self, shape, layout):
        return 0.0

    def engine_seconds(self, shape, layout):
        return 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(vocab_size=128, max_position_embeddings=512),
                           tmp_path_factory.mktemp("sim_tiny"))


def _workload(arrivals: list[int]) -> Workload:
    """Requests with shared 32- and 48-token prefixes (two groups), prompts 40-70 tokens, outputs 6-14."""
    groups = [list(range(3, 35)), list(range(40, 88))]
    items = []
    for i, step in enumerate(arrivals):
        prefix = groups[i % 2]
        tail = [(7 * i + j) % 120 + 5 for j in range(8 + 11 * (i % 3))]
        items.append(WorkItem(float(step), tuple(prefix + tail), 6 + 4 * (i % 3)))
    return Workload("test", tuple(items))


def _record(engine: LLMEngine) -> list:
    """Wraps the engine's executor so that every step's decisions are kept, per replica."""
    steps = []
    execute = engine.executor.execute_model

    def recording(scheduled, replica=0):
        steps.append((replica, _decisions(scheduled)))
        return execute(scheduled, replica)

    engine.executor.execute_model = recording
    return steps


def _decisions(scheduled) -> tuple:
    return (tuple(scheduled.num_scheduled_tokens.items()),
            tuple((r.req_id, r.num_computed_tokens) for r in scheduled.new_requests),
            tuple((r.req_id, r.num_computed_tokens, r.resumed_from_preemption) for r in scheduled.cached_requests))


def _run_real(engine: LLMEngine, workload: Workload) -> tuple[list, dict]:
    steps = _record(engine)
    pending = list(enumerate(workload.items))
    iteration, cached = 0, {}
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1].arrival_s <= iteration:
            i, item = pending.pop(0)
            params = SamplingParams(max_tokens=item.output_len, ignore_eos=True, temperature=0.0)
            engine.add_request(str(i), {"prompt_token_ids": list(item.prompt_token_ids)}, params)
        for output in engine.step():
            cached.setdefault(output.request_id, output.num_cached_tokens)
        iteration += 1
    return steps, cached


def _engine_args(tiny, **kw) -> dict:
    return dict(model=tiny, max_model_len=128, block_size=8, max_num_seqs=4, max_num_batched_tokens=48,
                long_prefill_token_threshold=24, skip_tokenizer_init=True, **kw)


def test_simulated_steps_equal_the_real_engine_with_arrivals_preemption_and_prefix_hits(tiny):
    """One replica, requests arriving over ten steps, a KV cache small enough to preempt: every step's batch,
    the new and resumed requests, the preemptions and the prefix hits are the real engine's."""
    workload = _workload([0, 0, 0, 1, 2, 3, 5, 6, 8, 10])
    args = _engine_args(tiny, num_gpu_blocks_override=20)
    engine = LLMEngine.from_engine_args(**args)
    try:
        real_steps, real_cached = _run_real(engine, workload)
        real_stats = engine.get_stats()
    finally:
        engine.shutdown()
    records = []
    config = EngineArgs(**args).create_engine_config()
    result = simulate(config, [20], UnitCost(), workload, records)
    assert [(r.replica, _decisions(r.scheduled)) for r in records] == real_steps
    assert real_stats.num_preemptions > 0 and result.num_preemptions == real_stats.num_preemptions
    assert real_stats.prefix_cache_hits > 0 and result.prefix_cache_hits == real_stats.prefix_cache_hits
    assert {str(i): r.cached_tokens for i, r in enumerate(result.requests)} == real_cached
    assert all(r.generated == r.output_len for r in result.requests)


@pytest.mark.slow
def test_simulated_steps_equal_the_real_engine_across_pipeline_stages_and_replicas(tiny):
    """Two replicas of two pipeline stages under mp (two micro-batches in flight each): the router's choices and
    each replica's steps are the real engine's."""
    workload = _workload([0] * 12)
    args = _engine_args(tiny, pipeline_parallel_size=2, data_parallel_size=2, distributed_executor_backend="mp",
                        num_gpu_blocks_override=40)
    engine = LLMEngine.from_engine_args(**args)
    try:
        real_steps, real_cached = _run_real(engine, workload)
    finally:
        engine.shutdown()
    records = []
    result = simulate(EngineArgs(**args).create_engine_config(), [40], UnitCost(), workload, records)
    for replica in (0, 1):
        simulated = [_decisions(r.scheduled) for r in records if r.replica == replica]
        assert simulated == [d for rep, d in real_steps if rep == replica]
        assert any(len(batch[0]) > 0 for batch in simulated)
    assert {str(i): r.cached_tokens for i, r in enumerate(result.requests)} == real_cached


def test_pipeline_overlaps_micro_batches_and_shared_cores_slow_each_other(tiny):
    """Unit stages: two stages carrying two micro-batches finish four one-token steps in 5 s (not 8); on a host
    of 1 core, two tasks of 1 s started together both end at 2 s."""
    workload = Workload("two", (WorkItem(0.0, (5,), 2), WorkItem(0.0, (6,), 2)))
    config = EngineArgs(**_engine_args(tiny, pipeline_parallel_size=2, distributed_executor_backend="mp",
                                       enable_prefix_caching=False)).create_engine_config()
    records = []
    result = simulate(config, [16], UnitCost(), workload, records)
    assert len(records) == 4 and max(r.end for r in records) == pytest.approx(5.0)
    assert result.duration == pytest.approx(5.0)

    events = EventQueue()
    host = SharedHost(events, cores=1)
    done = []
    host.run(1.0, lambda: done.append(events.now))
    host.run(1.0, lambda: done.append(events.now))
    events.run()
    assert done == pytest.approx([2.0, 2.0])
