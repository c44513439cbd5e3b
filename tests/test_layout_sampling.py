"""Seeded random sampling and preemption across parallel layouts under the ``mp`` executor.

A seeded request draws its noise from its own generator, so its tokens must not depend on how the model is split
(tensor, pipeline, data parallel), on which micro-batch a pipeline step puts it in while other steps are in
flight, nor on being preempted and recomputed: every layout gives the tokens of one roomy single-process run.
"""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_model
from dist_infer import LLM, SamplingParams
from parallel_helpers import MODELS

MODEL = "llama-kv2"  # 4 layers, 2 K/V heads: tp=2 splits the heads, pp=2 gives each stage 2 layers
VOCAB = MODELS[MODEL]()[0].vocab_size
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
    "dp2": dict(data_parallel_size=2),
}
# 16 blocks of 8 tokens: room for the longest request (78 tokens) but for about two of the workload's requests at
# once; the others are preempted and recomputed.
TINY_CACHE = dict(num_gpu_blocks_override=16, block_size=8, max_num_batched_tokens=32, max_model_len=96)


def _workload():
    """(prompt, params, arrival step): 8 requests (more than one pipeline micro-batch), seeded random sampling
    with various filters, two greedy rows among them, arriving over several steps."""
    g = torch.Generator().manual_seed(0)
    lengths = [3, 41, 70, 35, 21, 47, 9, 28]
    settings = [dict(temperature=0.9, seed=11), dict(temperature=1.3, top_p=0.9, seed=12), dict(temperature=0),
                dict(temperature=0.7, top_k=20, seed=13), dict(temperature=1.0, min_p=0.05, seed=14),
                dict(temperature=1.1, top_p=0.95, top_k=50, seed=15), dict(temperature=0),
                dict(temperature=0.8, seed=16)]
    max_tokens = [14, 10, 8, 12, 16, 9, 12, 14]
    arrivals = [0, 0, 0, 1, 1, 2, 4, 5]
    return [(torch.randint(0, VOCAB, (n,), generator=g).tolist(), SamplingParams(max_tokens=m, **kw), t)
            for n, kw, m, t in zip(lengths, settings, max_tokens, arrivals)]


def _drive(llm, items):
    """Adds each request at its arrival step and steps until all finish. Returns the tokens in item order and
    the most steps seen still in flight on one replica right after a step returned (>= 1 means that a
    pipeline held two steps at once)."""
    engine = llm.engine
    finished, step, most_in_flight = {}, 0, 0
    while len(finished) < len(items):
        for i, (prompt, params, arrival) in enumerate(items):
            if arrival == step:
                engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id)] = out.outputs[0].token_ids
        most_in_flight = max([most_in_flight] + [len(core.in_flight) for core in engine.cores])
        step += 1
        assert step < 2000, "requests did not finish"
    return [finished[i] for i in range(len(items))], most_in_flight


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(MODELS[MODEL]()[0], tmp_path_factory.mktemp("layout_sampling") / MODEL)


@pytest.fixture(scope="module")
def reference(model_path):
    """The tokens of one roomy single-process run (tp=pp=dp=1)."""
    items = _workload()
    with LLM(model=model_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22) as llm:
        tokens, _ = _drive(llm, items)
        greedy, _ = _drive(llm, [(p, SamplingParams(temperature=0, max_tokens=s.max_tokens), t)
                                 for p, s, t in items])
        assert llm.engine.get_stats().num_preemptions == 0
    # The sampling is really random: each seeded request leaves the greedy path somewhere.
    for (_, params, _), sampled, argmax in zip(items, tokens, greedy):
        assert (sampled == argmax) == (params.temperature == 0)
    return tokens


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_seeded_sampling_is_the_same_in_every_layout(model_path, reference, layout):
    with LLM(model=model_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="mp",
             **LAYOUTS[layout]) as llm:
        tokens, most_in_flight = _drive(llm, _workload())
        cores = llm.engine.cores
        stats = llm.engine.get_stats()
    assert tokens == reference
    assert stats.kv_blocks_free == stats.kv_blocks_total
    if layout == "pp2":
        assert most_in_flight >= 1  # steps overlapped in the pipeline
    if layout == "dp2":
        assert len(cores) == 2 and all(core.scheduler.stats.prefix_cache_queries > 0 for core in cores)


def test_preemption_with_pipeline_steps_in_flight_keeps_the_tokens(model_path, reference):
    """pp=2 with a KV cache too small for the workload: requests are preempted (never while in a step in
    flight) and recomputed, and greedy and seeded requests still give the roomy run's tokens."""
    with LLM(model=model_path, skip_tokenizer_init=True, distributed_executor_backend="mp",
             pipeline_parallel_size=2, **TINY_CACHE) as llm:
        tokens, most_in_flight = _drive(llm, _workload())
        stats = llm.engine.get_stats()
    assert stats.num_preemptions >= 3 and most_in_flight >= 1
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert tokens == reference
