"""What a tensor-parallel collective costs inside real steps, where its ranks are busy computing between calls.

A collective measured alone (``comm_profile``) finds every rank waiting for it. Inside a step each rank arrives
from its own computation, and where the group has more processes than the host has cores (tp 3 on 2 cores) a rank
that lost its core holds the others up for an operating-system time slice: milliseconds, not the microseconds of the
transfer. So the profile also runs the model's first layers under the mp executor at each tp size (one worker
process per rank, threads as the executor gives them), and takes, per run,

    latency = (Σ over steps of the slowest rank's step time - Σ of the steps' predicted compute at the shared
               cores' rate) / Σ collectives

with the compute predicted from the same profile's slice measurements (``cost_model.ProfiledCost``). The cost
model charges each collective the larger of this latency and its stand-alone time.

Such a latency is the ranks waiting for cores, so it grows with every other thread that wants them: the simulator
runs a collective as work of the group's threads on the shared cores (``events.SharedHost``), this latency being
what it took with only the group there. (Measured here with as many busy threads again beside a tp=3 group on 2
cores, it grew 1.8x, where sharing the cores predicts 2x.)
"""

from __future__ import annotations

import statistics

from dist_infer.planner.step_shape import Layout, step_shape


def measure_in_steps(folder: str, tp: int, dtype: str, cost, num_layers: int, batches=(1, 8, 32),
                     prompt_len: int = 32, output_len: int = 16, log=print) -> dict:
    """``folder``: a model of ``num_layers`` layers (the tp=1 slice); ``cost``: a ``ProfiledCost`` over the profile
    measured so far (its worker fits). Returns {"latency": seconds, "samples": [...]}."""
    from dist_infer.engine.llm_engine import LLMEngine
    from dist_infer.planner.events import EventQueue, SharedHost
    from dist_infer.sampling_params import SamplingParams

    layout = Layout(tp, 1, 1, (num_layers,))
    engine = LLMEngine.from_engine_args(model=folder, dtype=dtype, tensor_parallel_size=tp,
                                        distributed_executor_backend="mp", skip_tokenizer_init=True,
                                        max_model_len=prompt_len + output_len + 16, kv_cache_memory=64 << 20)
    shapes = []
    execute = engine.executor.execute_model

    def recording(scheduled, replica=0):
        requests = engine.replicas.replicas[replica].core.scheduler.requests
        shapes.append(step_shape(scheduled, {r: requests[r].num_tokens for r in scheduled.num_scheduled_tokens}))
        return execute(scheduled, replica)

    engine.executor.execute_model = recording
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)

    def run(batch: int) -> dict:
        shapes.clear()
        before = [t["compute_seconds"] for t in engine.executor.collective_rpc("timing")]
        for _ in range(batch):
            engine.add_request(engine.next_request_id(), {"prompt_token_ids": [7] * prompt_len}, params)
        while engine.has_unfinished_requests():
            engine.step()
        after = [t["compute_seconds"] for t in engine.executor.collective_rpc("timing")]
        predicted = 0.0
        for shape in shapes:  # each step's compute, stretched as the group's ranks share the cores
            events = EventQueue()
            host = SharedHost(events, cost.host_cores)
            demand, threads, efficiency = cost.stage_load(shape, layout)
            done = []
            host.run(cost.stage_seconds(shape, layout, 0), lambda: done.append(events.now), demand, threads,
                     efficiency)
            events.run(until=lambda: bool(done))
            predicted += done[0]
        return {"batch": batch, "steps": len(shapes), "compute_s": predicted,
                "measured_s": max(b - a for a, b in zip(before, after)),
                "collectives": len(shapes) * (2 * num_layers + 1) + sum(1 for s in shapes if s.num_sampled)}

    try:
        run(2)  # warm-up
        samples = [run(batch) for batch in batches]
    finally:
        engine.shutdown()
    latency = statistics.median(max(1e-6, (s["measured_s"] - s["compute_s"]) / s["collectives"]) for s in samples)
    log(f"  tp={tp}: a collective inside steps takes {latency * 1e3:.2f} ms")
    return {"latency": latency, "samples": samples}
