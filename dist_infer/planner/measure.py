"""Runs a workload on a real engine and times it the way the simulator does, for validating the planner.

Requests are added when their arrival time has come (wall clock from the start), between engine steps, as a
server's request thread would; an idle engine sleeps until the next arrival. Per request the first output's
time and the finishing time are taken as the engine returns them (``metrics.RequestTimes``).
"""

from __future__ import annotations

import time

from dist_infer.planner.metrics import RequestTimes, SimResult
from dist_infer.planner.workload import Workload
from dist_infer.sampling_params import SamplingParams


def run_workload(engine, workload: Workload, label: str = "") -> SimResult:
    """Serves ``workload`` on ``engine`` (an ``LLMEngine``); request ids are the workload's indexes."""
    pending = list(enumerate(workload.items))
    times: dict[str, RequestTimes] = {}
    start = time.perf_counter()
    before = engine.get_stats()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1].arrival_s <= now:
            i, item = pending.pop(0)
            params = SamplingParams(max_tokens=item.output_len, ignore_eos=True, temperature=0.0)
            engine.add_request(f"w{i}", {"prompt_token_ids": list(item.prompt_token_ids)}, params)
            times[f"w{i}"] = RequestTimes(item.arrival_s, item.prompt_len, item.output_len)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][1].arrival_s - (time.perf_counter() - start)))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for output in outputs:
            entry = times[output.request_id]
            generated = len(output.outputs[0].token_ids) if output.outputs else 0
            if generated and entry.first_token is None:
                entry.first_token = now
                entry.cached_tokens = output.num_cached_tokens
            entry.generated = max(entry.generated, generated)
            if output.finished:
                if output.error:
                    raise RuntimeError(f"request {output.request_id} failed: {output.error}")
                entry.finish = now
    stats = engine.get_stats()
    return SimResult(label, list(times.values()), num_steps=stats.num_steps - before.num_steps,
                     num_preemptions=stats.num_preemptions - before.num_preemptions,
                     prefix_cache_hits=stats.prefix_cache_hits - before.prefix_cache_hits)
