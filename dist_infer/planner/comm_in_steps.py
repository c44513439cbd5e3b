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

Such a latency is ranks waiting for cores, so it grows with the threads that compute beside the group (ranks
waiting in collectives of their own take no core): the runs are repeated with as many busy one-thread processes
beside the group as it has threads, and the latency's growth gives the exponent of

    latency(D) = latency(D0) x (D / D0) ** exponent

D the threads computing on the host plus the group's own D0 (``cost_model.ProfiledCost.comm_stretch``).
"""

from __future__ import annotations

import statistics

from dist_infer.planner.engine_profile import run_batch
from dist_infer.planner.step_shape import Layout, step_shape


def _spin(stop) -> None:
    """One busy thread of matrix products until ``stop`` is set: load beside the measured group."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def measure_in_steps(folder: str, tp: int, dtype: str, cost, num_layers: int, batches=(1, 8, 32),
                     prompt_len: int = 32, output_len: int = 16, log=print) -> dict:
    """``folder``: a model of ``num_layers`` layers (the tp=1 slice); ``cost``: a ``ProfiledCost`` over the profile
    measured so far (its worker fits). Returns {"latency", "loaded_latency", "threads", "exponent", "samples"}."""
    import math
    import multiprocessing

    from dist_infer.engine.llm_engine import LLMEngine
    from dist_infer.planner.events import EventQueue, SharedHost

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
    def run(batch: int, load: int = 0) -> dict:
        shapes.clear()
        _, _, compute = run_batch(engine, batch, prompt_len, output_len)
        predicted = 0.0
        for shape in shapes:  # each step's compute, stretched as the group's ranks share the cores
            events = EventQueue()
            host = SharedHost(events, cost.host_cores)
            demand, threads, efficiency = cost.stage_load(shape, layout)
            if load:  # the spinning processes share the cores too
                host.run(1e9, lambda: None, float(load), 1, efficiency)
            done = []
            host.run(cost.stage_seconds(shape, layout, 0), lambda: done.append(events.now), demand, threads,
                     efficiency)
            events.run(until=lambda: bool(done))
            predicted += done[0]
        return {"batch": batch, "load": load, "steps": len(shapes), "compute_s": predicted,
                "measured_s": max(compute),
                "collectives": len(shapes) * (2 * num_layers + 1) + sum(1 for s in shapes if s.num_sampled)}

    def latency(samples: list[dict]) -> float:
        return statistics.median(max(1e-6, (s["measured_s"] - s["compute_s"]) / s["collectives"]) for s in samples)

    own = tp * cost.threads(layout)  # the group's threads
    context = multiprocessing.get_context("spawn")
    try:
        run(2)  # warm-up
        alone = [run(batch) for batch in batches]
        stop = context.Event()
        spinners = [context.Process(target=_spin, args=(stop,), daemon=True) for _ in range(own)]
        for process in spinners:
            process.start()
        try:
            loaded = [run(batch, load=own) for batch in batches]
        finally:
            stop.set()
            for process in spinners:
                process.join(timeout=10)
    finally:
        engine.shutdown()
    base, more = latency(alone), latency(loaded)
    exponent = max(0.0, math.log(more / base) / math.log(2.0))
    log(f"  tp={tp}: a collective inside steps takes {base * 1e3:.2f} ms alone, {more * 1e3:.2f} ms beside as many "
        f"busy threads again (exponent {exponent:.2f})")
    return {"latency": base, "loaded_latency": more, "threads": own, "exponent": exponent, "samples": alone + loaded}
