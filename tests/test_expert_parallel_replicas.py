"""Expert parallelism across data-parallel replicas (``data_parallel_size=2``, ``enable_expert_parallel``): each
MoE layer's experts are spread over both replicas' workers, which share one world and step in lockstep (a
replica with nothing to run joins with an empty step).

- Parity with HF (tokens equal, logprobs within 1e-4) for every MoE family under mp and Ray, with chunked
  prefill and prefix caching on, while each worker holds half the experts; a request held by one replica
  alone (the other idle, running empty steps) matches too.
- A killed worker fails both replicas (they share a world); every request still finishes with the output an
  undisturbed run gives, and both come back with new workers.
- Adding or removing such replicas one by one is refused with a clear error.
"""

from __future__ import annotations

import os
import signal

import pytest

from dist_infer import LLM, SamplingParams
from moe_configs import FAMILIES
from parallel_helpers import (assert_matches_reference, drive_outputs, finish_after_fault, hf_greedy_with_logprobs,
                              pid_alive, save_with_reference, wait_until, workload)

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
CASES = [("mixtral", "mp"), ("qwen2_moe", "mp"), ("qwen3_moe", "mp"), ("mixtral", "ray"), ("qwen2_moe", "ray"),
         ("qwen3_moe", "ray")]
LONE = [3, 5, 7, 11, 13, 17, 19, 23]  # the prompt replica 1 runs alone


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("ep-dp"), {}
    for name in MOE:
        make, bias_std = FAMILIES[name]
        config = make()
        path, hf, _, reference = save_with_reference(config, root / name, bias_std=bias_std)
        built[name] = path, config, reference, hf_greedy_with_logprobs(hf, LONE, 20)
    return built



def _engine(path, backend, **kwargs):
    return LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, max_num_batched_tokens=64,
               data_parallel_size=2, enable_expert_parallel=True, distributed_executor_backend=backend,
               worker_timeout_s=30, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("family,backend", CASES)
def test_experts_spread_over_replicas_match_hf(checkpoints, family, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_session")
    path, config, reference, lone = checkpoints[family]
    with _engine(path, backend) as llm:
        engine = llm.engine
        assert engine.executor.lockstep
        completions = drive_outputs(llm, workload(config.vocab_size), logprobs=2)
        served = [core.scheduler.get_stats().num_steps for core in engine.cores]
        # One replica alone has work: the other runs empty steps so that its workers meet the MoE collectives.
        engine.add_request("lone", {"prompt_token_ids": LONE},
                           SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True), replica=1)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
        reports = engine.executor.collective_rpc("memory_report")
        stats = engine.get_stats()
    assert_matches_reference(completions + [outputs[0].outputs[0]], reference + [lone])
    assert stats.prefix_cache_hits > 0
    assert all(n > 0 for n in served), served  # both replicas served requests of the workload
    experts = [r["local_experts"] for r in reports]
    assert experts == [[0, 1, 2, 3], [4, 5, 6, 7]], experts  # each replica's worker holds half the experts
    assert reports[0]["expert_bytes"] == reports[1]["expert_bytes"] > 0


@pytest.mark.slow
def test_a_killed_worker_fails_both_replicas_and_loses_nothing(checkpoints):
    path, config, _, _ = checkpoints["mixtral"]
    prompts = [{"prompt_token_ids": [(5 * i + j) % (config.vocab_size - 2) + 2 for j in range(4 + 3 * i)]}
               for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with _engine(path, "mp", replica_restart_backoff_s=0.1) as llm:
        engine = llm.engine
        reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        old = [r["pid"] for r in engine.executor.collective_rpc("memory_report")]
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        finished = {}
        for _ in range(3):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert all(core.scheduler.num_unfinished for core in engine.cores) and not finished
        os.kill(old[1], signal.SIGKILL)  # replica 1's worker
        finish_after_fault(engine, finished, 120)
        assert [finished[str(i)].outputs[0].token_ids for i in range(6)] == reference
        events = [engine.replicas.replicas[d].events for d in (0, 1)]
        assert [e.failures for e in events] == [1, 1] and [e.rebuilds for e in events] == [1, 1]
        new = [r["pid"] for r in engine.executor.collective_rpc("memory_report")]
        assert not set(new) & set(old)
        assert wait_until(lambda: not any(pid_alive(p) for p in old), timeout=30)
        with pytest.raises(ValueError, match="share one world"):
            engine.replicas.set_target(3)
