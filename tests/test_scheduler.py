"""Scheduler and KV block manager alone, driven by fake model outputs (no torch, no model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dist_infer.config import SchedulerConfig
from dist_infer.engine.kv_cache_manager import KVCacheManager
from dist_infer.engine.messages import ModelRunnerOutput
from dist_infer.engine.request import Request, RequestStatus
from dist_infer.engine.scheduler import Scheduler
from dist_infer.sampling_params import SamplingParams

EOS = 0


def _request(rid, prompt, max_tokens=4, priority=0, arrival=None, **params):
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, **params), frozenset([EOS]), max_tokens,
                   priority=priority, arrival_time=arrival)


def _scheduler(num_blocks=8, block_size=4, max_num_seqs=4, budget=64, max_model_len=64, caching=True,
               threshold=None):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    config = SchedulerConfig(max_num_seqs, budget, threshold or budget)
    return Scheduler(config, kv, max_model_len), kv


def _fake_step(sched, token=7, tokens=None):
    """Schedules one step and answers it like a model would: a token for every request that caught up."""
    out = sched.schedule()
    result = ModelRunnerOutput()
    for rid, n in out.num_scheduled_tokens.items():
        req = sched.requests[rid]
        if req.num_computed_tokens + n == req.num_tokens:
            result.sampled_token_ids[rid] = (tokens or {}).get(rid, token)
    return out, sched.update_from_output(out, result)


def _run_all(sched, limit=500):
    outputs = {}
    for _ in range(limit):
        if not sched.num_unfinished:
            return outputs
        for o in _fake_step(sched)[1]:
            outputs.setdefault(o.req_id, []).extend(o.new_token_ids)
    raise AssertionError("requests did not finish")


def test_scheduler_modules_import_no_torch():
    code = ("import sys; import dist_infer.engine.scheduler, dist_infer.engine.kv_cache_manager, "
            "dist_infer.engine.request; bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ---- block manager -------------------------------------------------------------------------------------
def test_allocate_and_free_blocks():
    kv = KVCacheManager(5, 4, enable_prefix_caching=False)
    toks = list(range(100))
    assert kv.allocate_slots("a", toks, 0, 9) == [[0, 1, 2]]
    assert kv.allocate_slots("a", toks, 9, 3) == [[]]
    assert kv.allocate_slots("a", toks, 12, 1) == [[3]]
    assert kv.allocate_slots("b", toks, 0, 8) is None  # one block left: nothing is taken
    assert kv.num_free_blocks == 1
    kv.free("a")
    assert kv.num_free_blocks == 5


def test_shared_prefix_blocks_are_reference_counted():
    kv = KVCacheManager(10, 4)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    kv.allocate_slots("a", prompt, 0, 10)
    hits, n = kv.get_computed_blocks("b", prompt + [99])
    assert n == 8 and [h.block_id for h in hits[0]] == kv.block_ids("a")[:2]
    kv.allocate_slots("b", prompt + [99], 8, 3, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert [b.ref_cnt for b in kv.block_tables["b"][0][:2]] == [2, 2]
    assert kv.num_free_blocks == 10 - 3 - 1
    kv.free("a")
    assert [b.ref_cnt for b in kv.block_tables["b"][0][:2]] == [1, 1]  # still held by b
    kv.free("b")
    assert kv.num_free_blocks == 10
    # Freed but still cached: a third request with the prefix finds them.
    assert kv.get_computed_blocks("c", prompt)[1] == 8


def test_a_full_hit_still_leaves_the_last_token_to_compute():
    kv = KVCacheManager(10, 4)
    prompt = list(range(1, 9))  # exactly 2 blocks
    kv.allocate_slots("a", prompt, 0, 8)
    assert kv.get_computed_blocks("b", prompt)[1] == 4


def test_prefix_must_match_from_the_start():
    kv = KVCacheManager(10, 4)
    kv.allocate_slots("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 0, 9)
    assert kv.get_computed_blocks("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])[1] == 0  # first block differs
    assert kv.get_computed_blocks("c", [1, 2, 3, 4, 0, 6, 7, 8, 9])[1] == 4  # only the first block matches


def test_eviction_takes_the_least_recently_freed_and_tails_first():
    kv = KVCacheManager(4, 2)
    kv.allocate_slots("old", [1, 2, 3, 4], 0, 4)  # blocks 0, 1
    kv.allocate_slots("new", [5, 6, 7, 8], 0, 4)  # blocks 2, 3
    kv.free("old")  # queued tail first: 1, then 0
    kv.free("new")  # then 3, 2
    assert [b for b in kv.pool.free_queue] == [1, 0, 3, 2]
    kv.allocate_slots("x", [9, 9], 0, 2)  # evicts block 1 (old's second block)
    assert kv.get_computed_blocks("q1", [1, 2, 3, 4, 0])[1] == 2  # old's first block survives
    assert kv.get_computed_blocks("q2", [5, 6, 7, 8, 0])[1] == 4  # new's blocks untouched


def test_prefix_caching_off_shares_nothing():
    kv = KVCacheManager(10, 4, enable_prefix_caching=False)
    kv.allocate_slots("a", list(range(12)), 0, 12)
    assert kv.get_computed_blocks("b", list(range(12)))[1] == 0


# ---- scheduler -----------------------------------------------------------------------------------------
def test_prefill_then_decode_then_finish_on_length():
    sched, kv = _scheduler()
    sched.add_request(_request("a", 6, max_tokens=3))
    out, outputs = _fake_step(sched)
    assert out.num_scheduled_tokens == {"a": 6} and len(out.new_requests) == 1
    assert outputs[0].new_token_ids == [7] and outputs[0].finish_reason is None
    out, _ = _fake_step(sched)
    assert out.num_scheduled_tokens == {"a": 1}
    assert out.cached_requests[0].new_token_ids == [7]  # the worker learns the sampled token as a diff
    out, outputs = _fake_step(sched)
    assert outputs[0].finish_reason == "length"
    assert kv.num_free_blocks == kv.num_blocks and sched.num_unfinished == 0
    sched.add_request(_request("b", 2))
    assert "a" in _fake_step(sched)[0].finished_req_ids  # the workers drop a's state on the next step


def test_eos_and_stop_token_finish():
    sched, kv = _scheduler()
    sched.add_request(_request("a", 3, max_tokens=10))
    sched.add_request(_request("b", 3, max_tokens=10, stop_token_ids=[42]))
    _, outputs = _fake_step(sched, tokens={"a": EOS, "b": 42})
    reasons = {o.req_id: (o.finish_reason, o.stop_reason) for o in outputs}
    assert reasons == {"a": ("stop", None), "b": ("stop", 42)}
    assert kv.num_free_blocks == kv.num_blocks


def test_chunked_prefill_keeps_decodes_flowing():
    sched, kv = _scheduler(num_blocks=64, budget=8, threshold=6, max_model_len=128)
    sched.add_request(_request("short", 3, max_tokens=10))
    _fake_step(sched)
    sched.add_request(_request("long", 40, max_tokens=2))
    chunks = []
    while sched.requests.get("long") and sched.requests["long"].num_computed_tokens < 40:
        out, _ = _fake_step(sched)
        assert out.num_scheduled_tokens["short"] == 1  # the decode runs every step
        chunks.append(out.num_scheduled_tokens["long"])
    assert chunks == [6] * 6 + [4]  # capped by the chunk threshold, never over the budget


def test_new_request_starts_during_a_long_prefill():
    sched, _ = _scheduler(num_blocks=64, budget=8, threshold=4, max_model_len=128)
    sched.add_request(_request("long", 40, max_tokens=2))
    _fake_step(sched)
    sched.add_request(_request("late", 3, max_tokens=2))
    out, outputs = _fake_step(sched)
    assert out.num_scheduled_tokens == {"long": 4, "late": 3}
    assert [o.req_id for o in outputs] == ["late"]  # its first token while long is still prefilling


def test_waiting_queue_orders_by_priority_then_arrival():
    sched, _ = _scheduler(num_blocks=64, max_num_seqs=1)
    sched.add_request(_request("late-low", 2, max_tokens=1, priority=5, arrival=3.0))
    sched.add_request(_request("high", 2, max_tokens=1, priority=0, arrival=4.0))
    sched.add_request(_request("early-low", 2, max_tokens=1, priority=5, arrival=1.0))
    order = [next(iter(_fake_step(sched)[0].num_scheduled_tokens)) for _ in range(3)]
    assert order == ["high", "early-low", "late-low"]


def test_preemption_picks_lowest_priority_latest_arrival_and_it_resumes():
    # 6 blocks of 2 tokens. Three requests of 3-token prompts each take 2 blocks; growing needs more.
    sched, kv = _scheduler(num_blocks=6, block_size=2, budget=64, caching=False)
    sched.add_request(_request("a", 3, max_tokens=6, priority=0, arrival=1.0))
    sched.add_request(_request("b", 3, max_tokens=6, priority=1, arrival=2.0))  # lowest priority
    sched.add_request(_request("c", 3, max_tokens=6, priority=0, arrival=3.0))
    produced = {"a": 0, "b": 0, "c": 0}

    def step():
        out, outputs = _fake_step(sched)
        for o in outputs:
            produced[o.req_id] += len(o.new_token_ids)
        return out

    step()
    step()  # 4 tokens each: still 2 blocks
    assert kv.num_free_blocks == 0
    out = step()  # the 5th token needs a 3rd block
    assert sched.requests["b"].status == RequestStatus.PREEMPTED
    assert set(out.num_scheduled_tokens) == {"a", "c"}
    assert sched.requests["c"].status == RequestStatus.RUNNING  # same priority as a, but a arrived first
    while sched.num_unfinished:
        step()
    # b lost its blocks, not its tokens: every request ends with all it asked for, and nothing leaks.
    assert produced == {"a": 6, "b": 6, "c": 6}
    assert sched.stats.num_preemptions >= 1
    assert kv.num_free_blocks == 6


def test_a_request_in_a_step_in_flight_is_never_preempted():
    """Pipeline micro-batches: x's step has not returned when y needs a block. x is the preferred victim (lower
    priority) but holds blocks its in-flight step writes, so y, the only request not in flight, yields."""
    sched, kv = _scheduler(num_blocks=4, block_size=4, budget=64, caching=False)
    sched.add_request(_request("x", 8, max_tokens=8, priority=5, arrival=1.0))
    _fake_step(sched)  # x: 8 prompt tokens in 2 blocks, 1 sampled
    sched.add_request(_request("y", 4, max_tokens=8, priority=0, arrival=2.0))
    _fake_step(sched)  # x takes a 3rd block, y its 1st: the pool is full
    assert kv.num_free_blocks == 0
    in_flight = sched.schedule(max_requests=1)  # x's decode fits its 3rd block
    assert set(in_flight.num_scheduled_tokens) == {"x"}
    nxt = sched.schedule(max_requests=1)  # y's decode needs a 2nd block while x is in flight
    assert sched.requests["x"].status == RequestStatus.RUNNING
    assert sched.requests["y"].status == RequestStatus.PREEMPTED and not nxt.num_scheduled_tokens
    assert sched.stats.num_preemptions == 1
    sched.update_from_output(in_flight, ModelRunnerOutput(sampled_token_ids={"x": 7}))
    assert sched.requests["x"].num_computed_tokens == 10 and sched.requests["x"].num_output_tokens == 3
    assert _run_all(sched) and kv.num_free_blocks == 4


def test_resumed_request_is_sent_as_a_diff_with_its_new_table():
    sched, kv = _scheduler(num_blocks=4, block_size=2, budget=64, caching=False)
    sched.add_request(_request("a", 3, max_tokens=4, arrival=1.0))
    sched.add_request(_request("b", 3, max_tokens=4, arrival=2.0))
    _fake_step(sched)
    _fake_step(sched)  # b is preempted so that a can grow
    seen = None
    for _ in range(20):
        out, _ = _fake_step(sched)
        seen = seen or next((c for c in out.cached_requests if c.req_id == "b" and c.resumed_from_preemption), None)
        if not sched.num_unfinished:
            break
    assert seen is not None and seen.num_computed_tokens == 0
    assert len(seen.new_block_ids[0]) == kv.blocks_for(4 + 1)  # prompt + 1 output, recomputed in new blocks


def test_requests_that_can_never_fit_are_rejected():
    sched, _ = _scheduler(num_blocks=2, max_model_len=64)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request(_request("a", 6, max_tokens=6))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(_request("b", 60, max_tokens=6))
    sched.add_request(_request("c", 2, max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(_request("c", 2, max_tokens=2))


def test_abort_frees_blocks_waiting_and_running():
    sched, kv = _scheduler(num_blocks=5, max_num_seqs=1)
    for rid in "ab":
        sched.add_request(_request(rid, 6, max_tokens=6))
    _fake_step(sched)
    assert [r.request_id for r in sched.running] == ["a"] and sched.requests["b"].status == RequestStatus.WAITING
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 5 and sched.num_unfinished == 0
    assert sched.schedule().finished_req_ids == set()  # nothing ran; the ids wait for the next real step
    sched.add_request(_request("c", 2))
    assert {"a", "b"} <= _fake_step(sched)[0].finished_req_ids


def test_no_block_leaks_under_a_mixed_workload():
    import random

    rng = random.Random(0)
    sched, kv = _scheduler(num_blocks=24, block_size=4, budget=16, threshold=8, max_num_seqs=5, max_model_len=64)
    system = list(range(100, 112))  # a shared 3-block prefix
    live = []
    for i in range(40):
        prompt = system + [rng.randrange(1, 99) for _ in range(rng.randrange(1, 20))]
        rid = f"r{i}"
        sched.add_request(_request(rid, prompt, max_tokens=rng.randrange(1, 12), priority=rng.randrange(3)))
        live.append(rid)
        _fake_step(sched)
        if rng.random() < 0.2:
            sched.finish_requests([rng.choice(live)], RequestStatus.FINISHED_ABORTED)
    _run_all(sched)
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    stats = sched.get_stats()
    assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate < 1
