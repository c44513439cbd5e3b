"""The engine's own side of a step, measured on a real engine: everything a step's wall time holds beyond the
workers' compute -- scheduling, pickling the step to each worker process and the result back, applying it,
detokenizing -- as ``step + seqs * S + workers * (W - 1)`` seconds (S requests in the step, W worker processes
it is handed to).

One engine with one worker process and one with two (a two-stage pipeline carrying one step at a time, so that
nothing overlaps) each run batches of 1 to 64 requests; per run, (wall - Σ worker compute) / steps is one
sample of the per-step cost at that batch size.
"""

from __future__ import annotations

import time

from dist_infer.planner.fits import linear_fit

ENGINE_TERMS = ["step", "seqs", "workers"]


def run_batch(engine, batch: int, prompt_len: int, output_len: int) -> tuple[float, int, list[float]]:
    """Serves ``batch`` requests of ``prompt_len`` tokens and ``output_len`` outputs to the end: (wall seconds,
    steps, each worker's compute seconds in that time)."""
    from dist_infer.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    before = [t["compute_seconds"] for t in engine.executor.collective_rpc("timing")]
    for _ in range(batch):
        engine.add_request(engine.next_request_id(), {"prompt_token_ids": [7] * prompt_len}, params)
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    wall = time.perf_counter() - start
    after = [t["compute_seconds"] for t in engine.executor.collective_rpc("timing")]
    return wall, steps, [b - a for a, b in zip(before, after)]


def measure_engine(folder: str, dtype: str, batches=(1, 4, 16, 64), prompt_len: int = 16, output_len: int = 24,
                   log=print) -> dict:
    """The fitted per-step engine cost (``ENGINE_TERMS``) and its samples."""
    import os

    from dist_infer.engine.llm_engine import LLMEngine

    # A model without tokenizer files is served ids in, ids out: then there is nothing to detokenize.
    detokenizes = any(os.path.exists(os.path.join(folder, name)) for name in ("tokenizer.json", "tokenizer_config.json"))
    samples = []
    for workers in (1, 2):
        engine = LLMEngine.from_engine_args(
            model=folder, dtype=dtype, distributed_executor_backend="mp", pipeline_parallel_size=workers,
            max_batches_in_flight=1, max_model_len=prompt_len + output_len + 16, kv_cache_memory=64 << 20,
            skip_tokenizer_init=not detokenizes)
        try:
            run_batch(engine, 2, prompt_len, 4)  # warm-up
            for batch in batches:
                wall, steps, compute = run_batch(engine, batch, prompt_len, output_len)
                samples.append({"workers": workers, "seqs": batch, "seconds": (wall - sum(compute)) / steps})
        finally:
            engine.shutdown()
    features = [{"step": 1.0, "seqs": s["seqs"], "workers": s["workers"] - 1} for s in samples]
    coef = linear_fit(features, [max(s["seconds"], 1e-6) for s in samples], ENGINE_TERMS)
    log("  engine per step: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in coef.items()))
    return {"coef": coef, "samples": samples}
