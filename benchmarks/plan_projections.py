"""Projections from datasheets (no GPU was used): Llama-3-8B on one H100, Llama-3-70B on 8 and on 2 x 8 H100.

    python benchmarks/plan_projections.py          writes the section between <!-- projections:begin/end -->
                                                   in benchmarks/planner.md

Each case is ``dist-infer plan`` on an architecture-only model folder (benchmarks/planner_models) and a cluster
config (cluster_configs/h100-*.yaml): the H100 SXM datasheet roofline, ring collectives over NVLink inside a node
and 400 Gb/s between nodes. Workloads follow the published benchmarks they are compared with (vLLM v0.6.0's
ShareGPT runs: 500 prompts of 202 tokens on average, 179 output tokens, all at once; and a light load of 2
requests/s), with fixed lengths at those means.
"""

from __future__ import annotations

import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- projections:begin -->", "<!-- projections:end -->"

CASES = [
    {"name": "Llama-3-8B, 1 x H100, 500 requests at once (202 in / 179 out)", "model": "llama-3-8b",
     "cluster": "h100-1gpu.yaml", "workload": "batch:500:202:179",
     "published": "vLLM v0.6.0 (bf16, ShareGPT, 500 prompts at once): about 36.7 req/s, about 6.6k output tok/s "
                  "(read off the chart in blog.vllm.ai/2024/09/05/perf-update.html); TensorRT-LLM, FP8, "
                  "1000/1000 tokens: 15,220 output tok/s (TensorRT-LLM perf-overview)"},
    {"name": "Llama-3-8B, 1 x H100, 2 requests/s (202 in / 179 out)", "model": "llama-3-8b",
     "cluster": "h100-1gpu.yaml", "workload": "poisson:2:200:202:179",
     "published": "vLLM v0.6.0 at 2 QPS (ShareGPT): TPOT about 8 ms (all four engines 7-9 ms)"},
    {"name": "Llama-3-70B, 8 x H100 (one node), 500 requests at once", "model": "llama-3-70b",
     "cluster": "h100-8gpu.yaml", "workload": "batch:500:202:179",
     "published": "vLLM v0.6.0 publishes 70B on 4 x H100 (tp 4): about 17.3 req/s, about 3.1k output tok/s; "
                  "see the tp 4 x 1-replica row below"},
    {"name": "Llama-3-70B, 4 x H100, tp 4 only (vLLM's published setup)", "model": "llama-3-70b",
     "cluster": "h100-8gpu.yaml", "workload": "batch:500:202:179", "tp_sizes": [4], "pp_sizes": [1],
     "dp_sizes": [1],
     "published": "vLLM v0.6.0, 70B bf16 on 4 x H100 tp 4, ShareGPT 500 at once: about 17.3 req/s = about 3.1k "
                  "output tok/s"},
    {"name": "Llama-3-70B, 2 nodes x 8 H100 (400 Gb/s between nodes), 1000 requests at once", "model": "llama-3-70b",
     "cluster": "h100-2x8gpu.yaml", "workload": "batch:1000:202:179",
     "published": "none found for 70B on 2 nodes; vLLM's 405B post reports pp 2 x tp 8 about equal to tp 16 with "
                  "InfiniBand and 6.6x faster without it"},
]


def run_case(case: dict) -> dict:
    from dist_infer.planner.api import plan_model

    start = time.perf_counter()
    result = plan_model(os.path.join(HERE, "planner_models", case["model"]),
                        os.path.join(ROOT, "cluster_configs", case["cluster"]), case["workload"],
                        tp_sizes=case.get("tp_sizes"), pp_sizes=case.get("pp_sizes"), dp_sizes=case.get("dp_sizes"))
    return {"case": case, "seconds": time.perf_counter() - start, "source": result.cost_source,
            "workload": result.workload.describe(), "rows": result.rows()[:6],
            "refused": len(result.refused), "layouts": len(result.ranked)}


def render(results: list[dict]) -> str:
    lines = [BEGIN, "", "**Projections, not measurements**: datasheet rooflines of the H100 SXM (989 TFLOP/s bf16 "
                        "dense at 70 % efficiency, 3.35 TB/s at 80 %), 100 µs of kernel launches per layer (eager "
                        "PyTorch, no CUDA graphs), 2 ms + 20 µs per request of engine work per step, ring collectives "
                        "over NVLink (450 GB/s per direction) and 400 Gb/s InfiniBand. `python "
                        "benchmarks/plan_projections.py`.", ""]
    for r in results:
        case, rows = r["case"], r["rows"]
        best = rows[0]
        lines += [f"### {case['name']}", "",
                  f"{r['layouts']} layout(s) simulated ({r['refused']} refused: memory or shapes) in {r['seconds']:.0f} s. "
                  f"Chosen: **{best['layout']}**, {best['throughput_tok_s']:.0f} output tok/s "
                  f"({best['throughput_tok_s'] / best['workers']:.0f} per GPU), TTFT p50 "
                  f"{best['ttft_p50_s'] * 1e3:.0f} ms, mean TPOT {best['tpot_mean_s'] * 1e3:.1f} ms, "
                  f"{best['weights_gb']:.1f} GB of weights and {best['kv_cache_gb']:.1f} GB of KV cache "
                  f"({best['kv_tokens']} tokens) per GPU.", "",
                  "| layout | GPUs | output tok/s | per GPU | TTFT p50 | mean TPOT | KV tokens/replica | preemptions |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            lines.append(f"| {row['layout']} | {row['workers']} | {row['throughput_tok_s']:.0f} | "
                         f"{row['throughput_tok_s'] / row['workers']:.0f} | {row['ttft_p50_s'] * 1e3:.0f} ms | "
                         f"{row['tpot_mean_s'] * 1e3:.1f} ms | {row['kv_tokens']} | {row['preemptions']} |")
        lines += ["", f"Published: {case['published']}.", ""]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    results = []
    for case in CASES:
        results.append(run_case(case))
        best = results[-1]["rows"][0]
        print(f"{case['name']}: {best['layout']} {best['throughput_tok_s']:.0f} tok/s, TPOT "
              f"{best['tpot_mean_s'] * 1e3:.1f} ms ({results[-1]['seconds']:.0f} s)", flush=True)
    path = os.path.join(HERE, "planner.md")
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(path, "w") as f:
        f.write(head + render(results) + tail)


if __name__ == "__main__":
    main()
