"""Prune, then distill: activation-aware pruning and knowledge distillation on SmolLM2-135M-Instruct, written
into ``compression.md`` (between the ``distill`` markers).

    python benchmarks/bench_distill.py --workdir /tmp/bench_distill --steps 100
    python benchmarks/bench_distill.py --workdir /tmp/bench_distill --render     # the table from saved results

Each step runs the ``dist-infer`` command a user would type (the commands are printed in the table's notes);
a step whose output folder is complete is not rerun, and a distillation killed midway resumes from its last
checkpoint. Perplexity: ``dist-infer eval-ppl`` on the pinned corpus (4096 tokens, windows that neither
calibration nor training ever see). Speed: 128 new tokens per prompt at batch 1 and 32, dist-infer fp32, every
student and Hugging Face ``generate`` (fp32) in turn in one process, median of ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
BEGIN, END = "<!-- distill:begin -->", "<!-- distill:end -->"


def steps(args) -> list[dict]:
    """name, command (a dist-infer command line), the folder it writes, and the student it starts from."""
    w, train = args.workdir, ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                             "--grad-accumulation", str(args.grad_accumulation), "--lr", str(args.lr),
                             "--eval-every", "25", "--save-every", "25"]
    return [
        {"name": "50% unstructured, Wanda", "out": f"{w}/wanda50",
         "cmd": ["prune", "default", f"{w}/wanda50", "--method", "unstructured", "--sparsity", "0.5",
                 "--score", "wanda"]},
        {"name": "2:4, Wanda", "out": f"{w}/wanda24", "cmd": ["prune", "default", f"{w}/wanda24", "--method", "2:4",
                                                             "--score", "wanda"]},
        {"name": "structured 25%", "out": f"{w}/structured25",
         "cmd": ["prune", "default", f"{w}/structured25", "--method", "structured", "--sparsity", "0.25"]},
        {"name": "structured 25% + distillation", "out": f"{w}/structured25-distilled", "start": f"{w}/structured25",
         "cmd": ["distill", f"{w}/structured25-distilled", "--student", f"{w}/structured25", *train]},
        {"name": "25% of layers dropped", "out": f"{w}/drop25-distilled/initial-student", "virtual": True},
        {"name": "25% of layers dropped + distillation", "out": f"{w}/drop25-distilled",
         "start": f"{w}/drop25-distilled/initial-student",
         "cmd": ["distill", f"{w}/drop25-distilled", "--drop-layers", "0.25", *train]},
    ]


def run_step(step: dict) -> dict:
    done = os.path.isfile(os.path.join(step["out"], "config.json"))
    result = {"command": "dist-infer " + shlex.join(step["cmd"])} if "cmd" in step else {}
    if not done and "cmd" in step:
        print(f"$ {result['command']}", flush=True)
        start = time.perf_counter()
        subprocess.run(["dist-infer", *step["cmd"]], check=True)
        result["wall_s"] = time.perf_counter() - start
    summary_file = os.path.join(step["out"], "distill_summary.json")
    if os.path.isfile(summary_file):
        with open(summary_file, encoding="utf-8") as f:
            summary = json.load(f)
        result.update(train_tokens=summary["tokens"], train_s=summary["train_seconds"], steps=summary["steps"],
                      heldout=[summary["initial"], summary["final"]], dropped=summary.get("dropped_layers"),
                      teacher_s=teacher_seconds(summary["teacher_cache"]))
    return result


def teacher_seconds(cache: str) -> float | None:
    """How long the teacher took to score the training text, as recorded in its cache file."""
    from safetensors import safe_open

    if not os.path.isfile(cache):
        return None
    with safe_open(cache, "pt") as f:
        return float((f.metadata() or {}).get("teacher_seconds", "nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="folders of every step, kept between runs")
    parser.add_argument("--steps", type=int, default=100, help="distillation steps per student")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accumulation", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="only rewrite the table from saved results")
    parser.add_argument("--out", default=os.path.join(HERE, "compression.md"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    saved = os.path.join(args.workdir, "results.json")
    if args.render:
        with open(saved, encoding="utf-8") as f:
            results = json.load(f)
    else:
        results = measure(args, saved)
    write_section(args.out, render(results, args.workdir))
    print(f"section written to {args.out}")


def measure(args, saved: str) -> dict:
    import torch

    from bench_compression import machine, measure_speeds
    from dist_infer import LLM, SamplingParams
    from dist_infer.eval.perplexity import perplexity
    from dist_infer.model_loader.resolve import resolve_model_path
    from workloads import QUESTIONS

    base = resolve_model_path(None)
    rows = {"fp32": {"out": base}}
    for step in steps(args):
        rows[step["name"]] = {"out": step["out"], "start": step.get("start"), **run_step(step)}
    for name, row in rows.items():
        ppl = perplexity(args.ppl_tokens, show_progress=False, model=row["out"], dtype="float32")
        row.update(perplexity=ppl["perplexity"], weight_bytes=ppl["weight_bytes"])
        print(f"{name}: perplexity {ppl['perplexity']:.3f}", flush=True)
    speed_rows = ["fp32", "structured 25% + distillation", "25% of layers dropped + distillation"]
    engines = {name: LLM(model=rows[name]["out"], dtype="float32", kv_cache_memory=512 << 20) for name in speed_rows}
    # batch sizes as strings, as they come back from results.json for --render
    speeds = {name: {str(b): v for b, v in per.items()}
              for name, per in measure_speeds(engines, base, list(QUESTIONS[:16]), args, SamplingParams).items()}
    for llm in engines.values():
        llm.shutdown()
    results = {"rows": rows, "speeds": speeds, "date": datetime.date.today().isoformat(), "machine": machine(),
               "torch_threads": torch.get_num_threads(), "ppl_tokens": args.ppl_tokens, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "batch_sizes": args.batch_sizes}
    with open(saved, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def render(results: dict, workdir: str) -> str:
    """The section; the commands name the work folder ``out/`` wherever it was."""
    rows, speeds = results["rows"], results["speeds"]
    fp32 = rows["fp32"]["perplexity"]
    bs = [str(b) for b in results["batch_sizes"]]

    def speed(name):
        per = speeds.get(name)
        if per is None:
            return " | ".join("" for _ in bs)
        base = speeds["fp32"]
        return " | ".join(f"{per[b]:.1f} ({per[b] / base[b]:.2f}×)" for b in bs)

    lines = [BEGIN, "", "## Activation-aware pruning, then distillation", "",
             f"Produced by `python benchmarks/bench_distill.py` on {results['date']} ({results['machine']}). "
             f"Perplexity as above ({results['ppl_tokens']} tokens of the pinned corpus). Training text: the "
             f"calibration passages and the docstrings of the other standard-library modules (`--data stdlib`), "
             f"never the evaluation windows; the teacher is the fp32 model on dist-infer's engine (top-20 "
             f"logprobs, cached). Speed: {results['new_tokens']} new tokens per prompt, dist-infer fp32 and the "
             f"students in turn with HF `generate` in one process, median of {results['repeats']} rounds.", "",
             f"| step | perplexity | × fp32 | recovered | training tokens | training wall time | "
             + " | ".join(f"tok/s b{b} (× fp32)" for b in bs) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(bs)]
    for name, row in rows.items():
        recovered = ""
        if row.get("start"):
            start = next(r["perplexity"] for r in rows.values() if r["out"] == row["start"])
            recovered = f"{(start - row['perplexity']) / (start - fp32):.0%} of {start:.1f} → {fp32:.1f}"
        tokens = f"{row['train_tokens']:,}" if "train_tokens" in row else ""
        wall = f"{row['train_s'] / 60:.1f} min" if "train_s" in row else ""
        lines.append(f"| {name} | {row['perplexity']:.3f} | {row['perplexity'] / fp32:.2f}× | {recovered} | "
                     f"{tokens} | {wall} | {speed(name)} |")
    hf = speeds.get("HF generate (fp32)")
    if hf:
        lines.append("| *peer: HF `generate` fp32* | | | | | | " + speed("HF generate (fp32)") + " |")
    lines += ["", "Notes:", "",
              "- The table above predates activation-aware pruning: its magnitude rows are still what `--score "
              "magnitude` gives, but its structured 25% row (96.7) ranked channels by mean |x| × ‖W[:, c]‖; this "
              "section's structured row ranks by ‖X_c‖₂ × ‖W[:, c]‖₂ (the norms Wanda uses), the current "
              "method.",
              "- Recovered: the share of the perplexity lost to pruning (start → fp32) that distillation won back.",
              "- Training: forward KL over the teacher's top 20 (+ the rest as one outcome), AdamW with cosine "
              "decay, bf16 autocast, windows of 512 tokens; the wall time is the training loop's, the teacher's "
              "one-off scoring of the text (cached for every later student) is not included.",
              "", "Commands (each step as run; `default` is the embedded model, also the teacher):", ""]
    lines += [f"- {name}: `{row['command'].replace(workdir.rstrip('/') + '/', 'out/')}`"
              for name, row in rows.items() if row.get("command")]
    teacher = next((r["teacher_s"] for r in rows.values() if r.get("teacher_s")), None)
    if teacher:
        lines.append(f"- The teacher scored the training text once, in {teacher / 60:.0f} min (both students read "
                     f"the same cache).")
    dropped = next((r.get("dropped") for r in rows.values() if r.get("dropped")), None)
    if dropped:
        lines.append(f"- Blocks dropped (lowest block influence on calibration text): {dropped}.")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
