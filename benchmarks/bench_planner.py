"""Validates the planner on this machine: predicted against measured, for every layout a 2-core machine runs.

    python benchmarks/bench_planner.py --workdir W            profile, plan, measure; writes planner.md and the PNG
    python benchmarks/bench_planner.py --workdir W --render   only rewrite them from W/results.json

For SmolLM2 (the embedded model) and a tiny 8-layer model, each under a fixed batch and a Poisson workload:

1. ``dist-infer profile`` of the model (tp 1 and 3, 1 and 2 threads per worker), once, into W;
2. ``plan_model`` over tp {1, 3} x pp {1, 2} x dp {1, 2} with the mp executor, every layout simulated;
3. each layout run for real (``LLMEngine``, mp executor, the same KV cache size), the workload replayed in wall
   time (``planner.measure.run_workload``);
4. per layout the predicted and measured output throughput and mean TPOT (error = predicted / measured - 1), and
   the planner's ranking (closed batch: by throughput; Poisson: by mean TPOT) against the measured one.

Writes the table between ``<!-- planner:begin -->`` and ``<!-- planner:end -->`` in benchmarks/planner.md and the
scatter plot benchmarks/figures/planner_validation.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- planner:begin -->", "<!-- planner:end -->"
LAYOUTS = [(tp, pp, dp) for tp in (1, 3) for pp in (1, 2) for dp in (1, 2)]
KV_CACHE_MEMORY = 192 << 20  # per worker, the same for the engine and the plan


def tiny_model(workdir: str, tokenizer_dir: str) -> str:
    """A random 8-layer Llama (hidden 256, 6 heads, 3 K/V heads: tp 3 splits it) speaking SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = os.path.join(workdir, "tiny-8l")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    config = LlamaConfig(vocab_size=4096, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return folder


def cases(smollm2: str, tiny: str) -> list[dict]:
    return [
        {"model": "tiny 8-layer", "folder": tiny, "kind": "batch", "workload": "batch:32:64:64"},
        {"model": "tiny 8-layer", "folder": tiny, "kind": "poisson", "workload": "poisson:3:48:32-128:16-64"},
        {"model": "SmolLM2-135M", "folder": smollm2, "kind": "batch", "workload": "batch:16:64:32"},
        {"model": "SmolLM2-135M", "folder": smollm2, "kind": "poisson", "workload": "poisson:0.5:12:32-128:16-48"},
    ]


def engine_args(folder: str) -> dict:
    return {"model": folder, "max_model_len": 1024, "kv_cache_memory": KV_CACHE_MEMORY, "max_num_seqs": 64}


def measure(folder: str, layout: tuple, workload) -> dict:
    from dist_infer.engine.llm_engine import LLMEngine
    from dist_infer.planner.measure import run_workload
    from dist_infer.planner.workload import fixed_batch

    tp, pp, dp = layout
    engine = LLMEngine.from_engine_args(**engine_args(folder), tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        data_parallel_size=dp, distributed_executor_backend="mp")
    try:
        run_workload(engine, fixed_batch(16, 64, 2, 1000))  # first steps of each shape pay one-time costs
        return run_workload(engine, workload, f"tp{tp} pp{pp} dp{dp}").summary()
    finally:
        engine.shutdown()


def run(args) -> dict:
    from dist_infer.model_loader.resolve import resolve_model_path
    from dist_infer.planner.api import plan_model, profile
    from dist_infer.planner.profiler import load_profile
    from dist_infer.planner.workload import parse_workload

    os.makedirs(args.workdir, exist_ok=True)
    smollm2 = resolve_model_path(None)
    tiny = tiny_model(args.workdir, smollm2)
    results = {"created": time.strftime("%Y-%m-%d %H:%M"), "cases": []}
    profiles = {}
    for case in cases(smollm2, tiny):
        if case["folder"] not in profiles:
            path = os.path.join(args.workdir, f"profile-{os.path.basename(case['folder'])}.json")
            if not os.path.exists(path):
                start = time.perf_counter()
                profile(case["folder"], [1, 3], [1, 2], path)
                print(f"profiled {case['model']} in {time.perf_counter() - start:.0f} s", flush=True)
            profiles[case["folder"]] = path
        from dist_infer.config import ModelConfig

        vocab = ModelConfig(case["folder"], skip_tokenizer_init=True).vocab_size
        workload = parse_workload(case["workload"], vocab, seed=1)
        start = time.perf_counter()
        plan = plan_model(case["folder"], None, workload, profile=profiles[case["folder"]], tp_sizes=[1, 3],
                          pp_sizes=[1, 2], dp_sizes=[1, 2], **{k: v for k, v in engine_args(case["folder"]).items()
                                                               if k != "model"})
        plan_seconds = time.perf_counter() - start
        predicted = {(c.layout.tp, c.layout.pp, c.layout.dp): c.summary for c in plan.ranked}
        runs = {layout: [] for layout in LAYOUTS}
        for round_ in range(args.rounds):  # round-robin, so that this machine's drift spreads over every layout
            for layout in LAYOUTS:
                runs[layout].append(measure(case["folder"], layout, workload))
                p, m = predicted[layout], runs[layout][-1]
                print(f"{case['model']} {case['kind']} tp{layout[0]} pp{layout[1]} dp{layout[2]} run {round_}: "
                      f"throughput {p['throughput_tok_s']:.1f} / {m['throughput_tok_s']:.1f}, TPOT "
                      f"{p['tpot_mean_s'] * 1e3:.1f} / {m['tpot_mean_s'] * 1e3:.1f} ms (predicted / measured)",
                      flush=True)
        rows = [{"layout": list(layout), "predicted": predicted[layout], "runs": runs[layout],
                 "measured": {key: statistics.median(run[key] for run in runs[layout])
                              for key in ("throughput_tok_s", "tpot_mean_s", "ttft_p50_s", "ttft_mean_s")}}
                for layout in LAYOUTS]
        results["cases"].append({**{k: case[k] for k in ("model", "kind", "workload")},
                                 "workload_text": workload.describe(), "cost_source": plan.cost_source,
                                 "plan_seconds": plan_seconds, "planner_order": [str(c.layout) for c in plan.ranked],
                                 "rows": rows, "profile": load_profile(profiles[case["folder"]])["created"]})
        with open(os.path.join(args.workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def _key(kind: str):
    """What ranks layouts: closed batches by throughput (higher first), Poisson arrivals by mean TPOT (lower)."""
    return (lambda s: -s["throughput_tok_s"]) if kind == "batch" else (lambda s: s["tpot_mean_s"])


def render(results: dict) -> None:
    lines = [BEGIN, "", f"Measured {results['created']} on this machine (2 cores, no GPU); `python "
                        f"benchmarks/bench_planner.py --workdir W`. Error = predicted / measured - 1.", ""]
    worst = {"throughput": 0.0, "tpot": 0.0}
    noisy = {"throughput_tok_s": 0, "tpot_mean_s": 0}  # layouts whose own runs differ by more than 15 %
    total = 0
    for case in results["cases"]:
        key = _key(case["kind"])
        rows = case["rows"]
        name = lambda r: f"tp{r['layout'][0]} pp{r['layout'][1]} dp{r['layout'][2]}"  # noqa: E731
        predicted_order = [name(r) for r in sorted(rows, key=lambda r: key(r["predicted"]))]
        measured_order = [name(r) for r in sorted(rows, key=lambda r: key(r["measured"]))]
        lines += [f"### {case['model']}, {case['workload_text']}", "",
                  f"Ranked by {'throughput' if case['kind'] == 'batch' else 'mean TPOT'}: planner "
                  f"{' > '.join(predicted_order)}; measured {' > '.join(measured_order)} "
                  f"(**{'equal' if predicted_order == measured_order else 'different'}**). Planning all 8 layouts "
                  f"took {case['plan_seconds']:.1f} s.", "",
                  "| layout | throughput predicted | measured (runs) | error | mean TPOT predicted | measured (runs) | "
                  "error | TTFT p50 predicted | measured |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            p, m = r["predicted"], r["measured"]
            total += 1
            for metric in noisy:
                values = [x[metric] for x in r["runs"]]
                noisy[metric] += max(values) / min(values) - 1 > 0.15
            e_thr = p["throughput_tok_s"] / m["throughput_tok_s"] - 1
            e_tpot = p["tpot_mean_s"] / m["tpot_mean_s"] - 1
            worst["throughput"] = max(worst["throughput"], abs(e_thr))
            worst["tpot"] = max(worst["tpot"], abs(e_tpot))
            thr_runs = "/".join(f"{x['throughput_tok_s']:.1f}" for x in r["runs"])
            tpot_runs = "/".join(f"{x['tpot_mean_s'] * 1e3:.0f}" for x in r["runs"])
            lines.append(f"| {name(r)} | {p['throughput_tok_s']:.1f} tok/s | {m['throughput_tok_s']:.1f} "
                         f"({thr_runs}) | {e_thr:+.1%} | {p['tpot_mean_s'] * 1e3:.1f} ms | "
                         f"{m['tpot_mean_s'] * 1e3:.1f} ({tpot_runs}) | {e_tpot:+.1%} | "
                         f"{p['ttft_p50_s'] * 1e3:.0f} ms | {m['ttft_p50_s'] * 1e3:.0f} |")
        lines.append("")
    lines += [f"Largest error: throughput {worst['throughput']:.1%}, mean TPOT {worst['tpot']:.1%}.", "",
              f"Reproducibility of the measurements themselves: the runs of one layout differ by more than 15 % "
              f"(largest / smallest - 1) in {noisy['throughput_tok_s']} of {total} cases for throughput and in "
              f"{noisy['tpot_mean_s']} of {total} for mean TPOT.", "",
              "![predicted vs measured](figures/planner_validation.png)", "", END]
    path = os.path.join(HERE, "planner.md")
    text = open(path).read() if os.path.exists(path) else f"# The planner's predictions against measurements\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(path, "w") as f:
        f.write(head + "\n".join(lines) + tail)
    plot(results, os.path.join(HERE, "figures", "planner_validation.png"))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, metric, label, scale in ((axes[0], "throughput_tok_s", "output throughput (tok/s)", 1.0),
                                     (axes[1], "tpot_mean_s", "mean TPOT (ms)", 1e3)):
        values = []
        for case in results["cases"]:
            xs = [r["measured"][metric] * scale for r in case["rows"]]
            ys = [r["predicted"][metric] * scale for r in case["rows"]]
            values += xs + ys
            ax.scatter(xs, ys, label=f"{case['model']}, {case['kind']}", s=28)
        lo, hi = min(values) * 0.8, max(values) * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=1)
        ax.plot([lo, hi], [lo * 1.15, hi * 1.15], "k--", lw=0.7)
        ax.plot([lo, hi], [lo * 0.85, hi * 0.85], "k--", lw=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(label + " (dashed: ±15 %)")
    axes[0].legend(fontsize=8)
    fig.suptitle("dist-infer plan: predicted vs measured, every layout of tp {1,3} x pp {1,2} x dp {1,2} (mp, 2 cores)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="models, profiles and results.json")
    parser.add_argument("--render", action="store_true", help="only rewrite planner.md and the PNG from results.json")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every layout (the median is compared)")
    args = parser.parse_args()
    if args.render:
        with open(os.path.join(args.workdir, "results.json")) as f:
            results = json.load(f)
    else:
        results = run(args)
    render(results)


if __name__ == "__main__":
    main()
