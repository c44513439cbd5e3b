"""Replicas follow the load: an autoscaling policy (Ray Serve's fields) adds replicas under a load ramp and
removes them once idle, scale-down drains (no request fails, and requests still running when the drain
timeout ends move on with their exact tokens), an operator sets the count by hand, and the policy loads
from a cluster config's YAML."""

from __future__ import annotations

import argparse
import time

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import SamplingParams
from dist_infer.cluster_config import engine_args_from_cli
from dist_infer.engine.llm_engine import LLMEngine
from parallel_helpers import wait_until

BOUND_S = 120


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(num_hidden_layers=2), tmp_path_factory.mktemp("autoscale"))


def _engine(tiny_path, **kwargs) -> LLMEngine:
    return LLMEngine.from_engine_args(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22,
                                      distributed_executor_backend="mp", max_num_seqs=8, **kwargs)


def _prompt(i: int) -> dict:
    return {"prompt_token_ids": [(5 * i + j) % 120 + 2 for j in range(4 + i % 7)]}


def _serving(engine) -> int:
    return sum(state == "serving" for state in engine.replica_states().values())


def _run(engine, until, finished: dict) -> None:
    """Steps the engine until ``until()`` holds; collects finished outputs; no output may carry an error."""
    start = time.monotonic()
    while not until():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            time.sleep(0.02)  # idle: let the policy's clock move
        assert time.monotonic() - start < BOUND_S, f"timed out; replicas: {engine.replica_states()}"


def test_a_load_ramp_scales_out_to_max_and_back_to_min_when_idle(tiny_path):
    engine = _engine(tiny_path, min_replicas=1, max_replicas=3, target_ongoing_requests=2, upscale_delay_s=0.2,
                     downscale_delay_s=1.0, look_back_period_s=0.3)
    try:
        assert engine.replica_states() == {0: "serving"}
        finished, added = {}, 0
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        # The ramp: two requests more at a time while fewer than three replicas serve.
        def ramp_reached_three() -> bool:
            nonlocal added
            if engine.get_num_unfinished_requests() < 2 * (_serving(engine) + 2):
                for _ in range(2):
                    engine.add_request(f"ramp-{added}", _prompt(added), params)
                    added += 1
            return _serving(engine) == 3
        _run(engine, ramp_reached_three, finished)
        # New work reaches the new replicas.
        for i in range(6):
            engine.add_request(f"late-{i}", _prompt(i), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        per_replica = {r.index: r.core.scheduler.num_unfinished for r in engine.replicas.replicas.values() if r.core}
        assert all(per_replica[d] > 0 for d in (1, 2)), per_replica
        # Load ends: every request finishes (none fails while replicas drain), then back to one replica.
        _run(engine, lambda: not engine.get_num_unfinished_requests() and _serving(engine) == 1
             and "draining" not in engine.replica_states().values(), finished)
        assert len(finished) == added + 6
        assert sorted(engine.replica_states().values()).count("stopped") == 2
        assert engine.replica_states()[0] == "serving"
    finally:
        engine.shutdown()


def test_scale_down_by_hand_drains_and_moves_what_outlives_the_drain(tiny_path):
    engine = _engine(tiny_path, data_parallel_size=3)
    try:
        params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
                  SamplingParams(temperature=1.0, seed=9, max_tokens=60, ignore_eos=True)]
        reference = {}
        for i in range(6):  # undisturbed answers, each pinned to replica 0
            engine.add_request(f"ref-{i}", _prompt(i), params[i % 2], replica=0)
        _run(engine, lambda: not engine.has_unfinished_requests(), reference)
        expected = [reference[f"ref-{i}"].outputs[0].token_ids for i in range(6)]

        def run_then_scale(tag: str, count: int) -> list:
            finished = {}
            for i in range(6):
                engine.add_request(f"{tag}-{i}", _prompt(i), params[i % 2], replica=i % 3)
            for _ in range(3):  # every replica is generating
                engine.step()
            assert all(r.core.scheduler.running for r in engine.replicas.replicas.values() if r.state.value == "serving")
            engine.set_num_replicas(count)
            _run(engine, lambda: not engine.has_unfinished_requests()
                 and "draining" not in engine.replica_states().values(), finished)
            return [finished[f"{tag}-{i}"].outputs[0].token_ids for i in range(6)]

        # 3 -> 2: replica 2 leaves the router and finishes its own requests (no move, no failure).
        assert run_then_scale("drain", 2) == expected
        assert engine.replica_states() == {0: "serving", 1: "serving", 2: "stopped"}
        assert engine.replicas.replicas[2].events.migrations == 0
        # 2 -> 1 with no time to drain: replica 1's requests move to replica 0 with their exact tokens.
        engine.replicas.replica_config.drain_timeout_s = 0.0
        finished = {}
        for i in range(6):
            engine.add_request(f"move-{i}", _prompt(i), params[i % 2], replica=i % 2)
        for _ in range(3):
            engine.step()
        engine.set_num_replicas(1)
        _run(engine, lambda: not engine.has_unfinished_requests()
             and "draining" not in engine.replica_states().values(), finished)
        assert [finished[f"move-{i}"].outputs[0].token_ids for i in range(6)] == expected
        assert engine.replicas.replicas[1].events.migrations == 3
        assert engine.replica_states() == {0: "serving", 1: "stopped", 2: "stopped"}
        # And up again by hand: a new replica starts and serves.
        engine.set_num_replicas(2)
        _run(engine, lambda: _serving(engine) == 2, finished)
    finally:
        engine.shutdown()


def test_the_policy_loads_from_a_cluster_config(tmp_path, tiny_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"engine:\n  model: {tiny_path}\n  distributed_executor_backend: mp\n"
                    "autoscaling:\n  min_replicas: 2\n  max_replicas: 5\n  target_ongoing_requests: 3\n"
                    "  upscale_delay_s: 7\n  downscale_delay_s: 70\n")
    args = engine_args_from_cli(argparse.Namespace(config_file=str(path), downscale_delay_s=80.0))
    config = args.create_engine_config()
    policy = config.replica_config.autoscaling
    assert (policy.min_replicas, policy.max_replicas, policy.initial_replicas) == (2, 5, 2)
    assert (policy.target_ongoing_requests, policy.upscale_delay_s, policy.downscale_delay_s) == (3, 7, 80)
    assert config.parallel_config.data_parallel_size == 2  # it starts with initial_replicas
    with pytest.raises(ValueError, match="data_parallel_size=3 disagrees"):
        engine_args_from_cli(argparse.Namespace(config_file=str(path), data_parallel_size=3)).create_engine_config()
    with pytest.raises(ValueError, match="autoscaling.*'mp' or 'ray'"):
        engine_args_from_cli(argparse.Namespace(config_file=str(path), distributed_executor_backend="torchrun")
                             ).create_engine_config()
