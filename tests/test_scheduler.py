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


def _request(rid, prompt_len, max_tokens=4, **params):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **params),
                   frozenset([EOS]), max_tokens)


def _scheduler(num_blocks=8, block_size=4, max_num_seqs=4, max_tokens=64, max_model_len=64):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens), kv, max_model_len), kv


def _fake_step(sched, token=7, tokens=None):
    out = sched.schedule()
    result = ModelRunnerOutput()
    for rid, n in out.num_scheduled_tokens.items():
        req = sched.requests[rid]
        if req.num_computed_tokens + n == req.num_tokens:
            result.sampled_token_ids[rid] = (tokens or {}).get(rid, token)
    return out, sched.update_from_output(out, result)


def test_scheduler_modules_import_no_torch():
    code = ("import sys; import dist_infer.engine.scheduler, dist_infer.engine.kv_cache_manager, "
            "dist_infer.engine.request; bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_allocate_and_free_blocks():
    kv = KVCacheManager(5, 4)
    assert kv.allocate_slots("a", 9) == [0, 1, 2]
    assert kv.allocate_slots("a", 12) == []
    assert kv.allocate_slots("a", 13) == [3]
    assert kv.allocate_slots("b", 8) is None  # only one block left: nothing is taken
    assert kv.num_free_blocks == 1
    kv.free("a")
    assert kv.num_free_blocks == 5
    assert kv.allocate_slots("b", 8) == [4, 0]


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


def test_ignore_eos_keeps_going():
    sched, _ = _scheduler()
    sched.add_request(_request("a", 3, max_tokens=5, ignore_eos=True))
    _, outputs = _fake_step(sched, token=EOS)
    assert outputs[0].finish_reason is None


def test_admission_reserves_full_length_and_waits_for_blocks():
    # 8 blocks of 4 tokens; each request needs ceil((6 + 6) / 4) = 3 blocks at full length.
    sched, kv = _scheduler(num_blocks=8)
    for rid in "abc":
        sched.add_request(_request(rid, 6, max_tokens=6))
    out, _ = _fake_step(sched)
    assert set(out.num_scheduled_tokens) == {"a", "b"}  # a third would not fit at full length
    for _ in range(5):  # a and b decode their remaining 5 tokens while c waits
        assert sched.requests["c"].status == RequestStatus.WAITING
        _fake_step(sched)
    assert "a" not in sched.requests and "b" not in sched.requests
    assert "c" in _fake_step(sched)[0].num_scheduled_tokens
    while sched.num_unfinished:
        _fake_step(sched)
    assert kv.num_free_blocks == 8


def test_max_num_seqs_and_token_budget():
    sched, _ = _scheduler(num_blocks=64, max_num_seqs=2)
    for rid in "abc":
        sched.add_request(_request(rid, 4))
    assert set(_fake_step(sched)[0].num_scheduled_tokens) == {"a", "b"}
    sched2, _ = _scheduler(num_blocks=64, max_tokens=10)
    sched2.add_request(_request("x", 6))
    sched2.add_request(_request("y", 6))
    assert set(_fake_step(sched2)[0].num_scheduled_tokens) == {"x"}  # 6 + 6 > 10


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
    sched, kv = _scheduler(num_blocks=5)  # room for one request at full length (3 blocks), not two
    for rid in "ab":
        sched.add_request(_request(rid, 6, max_tokens=6))
    _fake_step(sched)
    assert "a" in [r.request_id for r in sched.running] and "b" in [r.request_id for r in sched.waiting]
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 5 and sched.num_unfinished == 0
    assert sched.schedule().finished_req_ids == set()  # nothing ran; the ids wait for the next real step
    sched.add_request(_request("c", 2))
    assert {"a", "b"} <= _fake_step(sched)[0].finished_req_ids
