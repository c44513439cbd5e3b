"""Compression methods side by side on one model: memory, quality and speed, written to ``compression.md``.

    python benchmarks/bench_compression.py                  # SmolLM2-135M-Instruct, the full table
    python benchmarks/bench_compression.py --ppl-tokens 1024 --repeats 1 --methods fp32 int8

For each method (weight quantization, KV-cache int8, pruned checkpoints written by ``prune_checkpoint``):
* weight bytes as loaded (quantized weights as the chosen kernels hold them) and KV-cache bytes per token;
* perplexity on the pinned corpus (``dist-infer eval-ppl``: same tokens for every method) and its change from
  fp32;
* greedy agreement with fp32: 16 prompts, 128 new tokens each (EOS ignored), as the mean fraction of the 128
  positions before the first token that differs, and the number of prompts that match entirely;
* generation speed at batch 1 and batch 32 (128 new tokens each), with Hugging Face ``generate`` in fp32 on
  the same weights as the peer. Speed rounds go over every method in turn (all engines stay loaded), so
  drift in machine load hits all alike; the median of ``--repeats`` rounds after a short warm-up is kept,
  and every speed is also given as a ratio to dist-infer fp32 of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from workloads import QUESTIONS

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Method:
    name: str
    engine: dict = field(default_factory=dict)  # LLM keyword arguments on top of the base model in fp32
    prune: tuple | None = None  # (method, sparsity[, score]) for prune_checkpoint
    quantize: tuple | None = None  # (method, group size, algorithm) for quantize_checkpoint
    note: str = ""


METHODS = [
    Method("fp32"),
    Method("bf16", {"dtype": "bfloat16"}, note="weights and activations bf16; norms, softmax, sampling fp32"),
    Method("int8", {"quantization": "int8"}, note="per output channel, symmetric; embedding table and LM head int8 too"),
    Method("int8, fp32 head", {"quantization": "int8", "quantize_lm_head": False},
           note="as int8, the embedding table and LM head left in fp32"),
    Method("int4-g64", {"quantization": "int4", "quantization_group_size": 64},
           note="round to nearest at load time"),
    Method("int4-g128", {"quantization": "int4", "quantization_group_size": 128},
           note="round to nearest at load time"),
    Method("int4-g64 GPTQ", quantize=("int4", 64, "gptq"),
           note="`dist-infer quantize --algorithm gptq`: act order, static groups, range search"),
    Method("int4-g128 GPTQ", quantize=("int4", 128, "gptq"), note="as above"),
    Method("int4-g32 (GGUF)", {"model": None, "quantization": "int4", "quantization_group_size": 32},
           note="the GGUF's Q4_1 blocks loaded as they are (no fp32 round trip); embedding table and LM head int8"),
    Method("int4-g32 (GGUF), fp32 head", {"model": None, "quantization": "int4", "quantization_group_size": 32,
                                          "quantize_lm_head": False},
           note="as int4-g32 (GGUF), the embedding table and LM head left in fp32"),
    Method("KV int8", {"kv_cache_dtype": "int8"}, note="fp32 weights; int8 KV with a scale per block and head"),
    Method("50% unstructured", prune=("unstructured", 0.5, "magnitude"), note="magnitude, per layer; dense kernels"),
    Method("2:4", prune=("2:4", 0.5, "magnitude"), note="2 of every 4 inputs kept; dense kernels (masks) on the CPU"),
    Method("50% Wanda", prune=("unstructured", 0.5, "wanda"),
           note="|w| x input-channel norm, per output row, calibrated block by block; dense kernels"),
    Method("2:4 Wanda", prune=("2:4", 0.5, "wanda"), note="2 of every 4 kept by Wanda score; dense kernels"),
    Method("structured 25%", prune=("structured", 0.25),
           note="KV groups and MLP channels ranked on calibration text"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS], help="subset, by name")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "compression.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--render", default=None, metavar="JSON", help="only rewrite the table from saved results")
    args = parser.parse_args()
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            saved = json.load(f)
        for row in saved["rows"].values():  # JSON keys are strings
            row["tok_s"] = {int(b): v for b, v in row["tok_s"].items()}
        saved["meta"]["hf_tok_s"] = {int(b): v for b, v in saved["meta"]["hf_tok_s"].items()}
        write_table(args.out, render(saved["rows"], saved["meta"], args))
        return
    unknown = set(args.methods) - {m.name for m in METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {[m.name for m in METHODS]}")
    methods = [m for m in METHODS if m.name in args.methods]
    if methods[0].name != "fp32":
        methods.insert(0, METHODS[0])  # agreement and ratios are against fp32

    from dist_infer import LLM, SamplingParams
    from dist_infer.compression.pruning import prune_checkpoint
    from dist_infer.compression.quantize import quantize_checkpoint
    from dist_infer.eval.perplexity import perplexity
    from dist_infer.model_loader.resolve import resolve_model_path

    base = resolve_model_path(None)
    workdir = tempfile.mkdtemp(prefix="bench_compression_")
    prompts = list(QUESTIONS[:16])
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows, engines = {}, {}
    for method in methods:
        kwargs = {"model": base, "dtype": "float32", **method.engine}
        summary = {}
        if method.prune is not None:
            kind, sparsity, *score = method.prune
            kwargs["model"] = os.path.join(workdir, "_".join([kind.replace(":", "_"), *score]))
            summary = prune_checkpoint(base, kwargs["model"], kind, sparsity, show_progress=False,
                                       **({"score": score[0]} if score else {}))
        if method.quantize is not None:
            kind, group_size, algorithm = method.quantize
            kwargs["model"] = os.path.join(workdir, f"{kind}_g{group_size}_{algorithm}")
            quantize_checkpoint(base, kwargs["model"], kind, group_size, show_progress=False, algorithm=algorithm)
        start = time.perf_counter()
        ppl = perplexity(args.ppl_tokens, show_progress=False, **kwargs)
        gc.collect()
        llm = LLM(**kwargs, kv_cache_memory=512 << 20)
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        engines[method.name] = llm
        rows[method.name] = row = {
            "note": method.note, "weight_bytes": ppl["weight_bytes"], "kv_bytes_per_token": ppl["kv_bytes_per_token"],
            "perplexity": ppl["perplexity"], "ppl_tokens": ppl["tokens"], "tokens": outputs,
            "pruning": {k: v for k, v in summary.items() if k != "dest"},
        }
        print(f"{method.name}: perplexity {row['perplexity']:.4f}, weights {row['weight_bytes'] / 1e6:.1f} MB "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    reference = rows["fp32"]["tokens"]
    for row in rows.values():
        row["agreement"], row["identical"] = agreement(reference, row["tokens"])
        row["ppl_change"] = row["perplexity"] / rows["fp32"]["perplexity"] - 1

    speeds = measure_speeds(engines, base, prompts, args, SamplingParams)
    for name, row in rows.items():
        row["tok_s"] = speeds[name]
    for llm in engines.values():
        llm.shutdown()

    meta = {"model": "SmolLM2-135M-Instruct (embedded GGUF, Q4_1, converted to fp32)",
            "date": datetime.date.today().isoformat(), "machine": machine(), "ppl_tokens": args.ppl_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "batch_sizes": args.batch_sizes,
            "hf_tok_s": speeds["HF generate (fp32)"]}
    write_table(args.out, render(rows, meta, args))
    print(f"table written to {args.out}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def write_table(path: str, table: str) -> None:
    """The table, keeping the section ``bench_distill.py`` writes below it."""
    from bench_distill import BEGIN

    kept = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        kept = "\n" + text[text.index(BEGIN):] if BEGIN in text else ""
    with open(path, "w", encoding="utf-8") as f:
        f.write(table + kept)


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> tuple[float, int]:
    """Mean fraction of positions before the first differing token, and how many sequences match entirely."""
    fractions = []
    for ref, got in zip(reference, tokens):
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        fractions.append(same / len(ref))
    return statistics.mean(fractions), sum(f == 1.0 for f in fractions)


def measure_speeds(engines: dict, base: str, prompts: list[str], args, SamplingParams) -> dict:
    """name -> {batch: median tokens/s}, including the Hugging Face peer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def run_hf(batch, new_tokens):
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = hf.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)

    def runner(llm):
        def run(batch, new_tokens):
            params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            return sum(len(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False))
        return run

    runners = {name: runner(llm) for name, llm in engines.items()}
    runners["HF generate (fp32)"] = run_hf
    samples = {name: {bs: [] for bs in args.batch_sizes} for name in runners}
    for round_ in range(args.repeats + 1):
        warm_up = round_ == 0
        for bs in args.batch_sizes:
            batch = [prompts[i % len(prompts)] for i in range(bs)]
            for name, run in runners.items():
                start = time.perf_counter()
                tokens = run(batch, 8 if warm_up else args.new_tokens)
                if not warm_up:
                    samples[name][bs].append(tokens / (time.perf_counter() - start))
        if not warm_up:
            print(f"speed round {round_}/{args.repeats} done", flush=True)
    return {name: {bs: statistics.median(v) for bs, v in per.items()} for name, per in samples.items()}


def machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"


def render(rows: dict, meta: dict, args) -> str:
    fp32 = rows["fp32"]
    bs = meta["batch_sizes"]
    speed_head = " | ".join(f"tok/s b{b} (× fp32)" for b in bs)
    lines = [
        "# Compression on SmolLM2-135M-Instruct",
        "",
        f"Produced by `python benchmarks/bench_compression.py` on {meta['date']} ({meta['machine']}). "
        f"Perplexity over {fp32['ppl_tokens']} tokens of the pinned corpus (`dist-infer eval-ppl`: standard-library "
        f"docstrings, windows of 512, fed in chunks of 128 through the paged KV cache). Agreement: greedy decoding "
        f"of {len(fp32['tokens'])} prompts × {meta['new_tokens']} tokens against fp32, as the mean fraction of "
        f"positions before the first differing token (and the prompts identical throughout). "
        f"Speed: {meta['new_tokens']} "
        f"new tokens per prompt, median of {meta['repeats']} rounds taken in turn over every method in one process.",
        "",
        f"| method | weight bytes | KV bytes/token | perplexity | Δ vs fp32 | greedy agreement | {speed_head} |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(bs),
    ]
    for name, row in rows.items():
        speeds = " | ".join(f"{row['tok_s'][b]:.1f} ({row['tok_s'][b] / fp32['tok_s'][b]:.2f}×)" for b in bs)
        lines.append(
            f"| {name} | {row['weight_bytes'] / 1e6:.1f} MB | {row['kv_bytes_per_token'] / 1024:.1f} KiB | "
            f"{row['perplexity']:.3f} | {row['ppl_change']:+.2%} | {row['agreement']:.1%} "
            f"({row['identical']}/{len(row['tokens'])}) | {speeds} |")
    hf = meta["hf_tok_s"]
    lines.append(f"| *peer: HF `generate` fp32* | | | | | | "
                 + " | ".join(f"{hf[b]:.1f} ({hf[b] / fp32['tok_s'][b]:.2f}×)" for b in bs) + " |")
    lines += ["", "Notes:", ""]
    for name, row in rows.items():
        extra = row["note"]
        pruning = row["pruning"]
        if pruning.get("method") == "structured":
            extra += (f"; heads {pruning['heads_before']}→{pruning['heads_after']} (KV groups "
                      f"{pruning['kv_heads_before']}→{pruning['kv_heads_after']}: whole groups only), MLP channels "
                      f"{pruning['intermediate_before']}→{pruning['intermediate_after']}; no fine-tuning")
        if pruning:
            extra += f"; {pruning['achieved_sparsity']:.1%} of decoder-layer weights zero or removed"
        if extra:
            lines.append(f"- **{name}**: {extra}.")
    lines += [
        "- Weight bytes count what the engine keeps after loading (all parameters, embeddings included: the "
        "tied 49152 × 576 embedding alone is 113 MB in fp32).",
        "- The base weights are the GGUF's Q4_1 (group 32) values in fp32. Requantizing them at group 32 "
        "reproduces them (the int4-g32 (GGUF) row); coarser groups cannot follow the 32-wide grids, which round "
        "to nearest pays for and GPTQ (calibrated on the corpus passages that evaluation never sees) mostly "
        "recovers.",
        "- Greedy agreement over 128 tokens of raw-text continuation is strict: one flipped near-tie changes the "
        "rest of the sequence, so even bf16 parts from fp32 early; perplexity is the finer measure of quality.",
        "- On this CPU the fused weight-only kernels win at batch 1 (memory-bound) but hardly at batch 32, where "
        "fp32 runs oneDNN's packed matmul. The kernel is chosen by timing per shape, so runs may differ in it "
        "(and in the last digits of int8's perplexity); `DIST_INFER_QUANT_KERNEL` pins it. The int8 KV cache "
        "decodes in the same fused C kernel as fp32, scaling per block. Pruned rows have no recovery "
        "fine-tuning. Speeds on this shared 2-core machine vary by about ±10 % between runs; compare ratios.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
