"""Offline generation speed: dist-infer against Hugging Face ``generate`` on the same weights, same run.

    python benchmarks/bench_generate.py                     # SmolLM2-135M-Instruct, fp32, batch 1 and 16
    python benchmarks/bench_generate.py --batch-sizes 1 4 --new-tokens 64 --repeats 5

Both engines generate exactly ``--new-tokens`` greedy tokens per prompt (EOS ignored) from the same prompts;
HF gets the batch left-padded. Runs alternate between the two engines so that drift in machine load hits
both alike; the median of ``--repeats`` timed runs (after one warm-up each) is reported, with the ratio
dist-infer / HF (above 1: dist-infer is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from workloads import QUESTIONS



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_infer import LLM, SamplingParams
    from dist_infer.model_loader.resolve import resolve_model_path

    path = resolve_model_path(args.model)
    dtype = getattr(torch, args.dtype)
    llm = LLM(model=path, dtype=args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # both engines run the full length
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)

    def run_ours(prompts):
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def run_hf(prompts):
        batch = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = hf.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)

    print(f"model={path}\ndtype={args.dtype} new_tokens={args.new_tokens} threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'dist-infer tok/s':>17} {'HF tok/s':>10} {'ratio':>7}")
    results = []
    for bs in args.batch_sizes:
        prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(bs)]
        run_ours(prompts), run_hf(prompts)  # warm-up
        ours, theirs = [], []
        for _ in range(args.repeats):
            for runner, sink in ((run_ours, ours), (run_hf, theirs)):
                start = time.perf_counter()
                tokens = runner(prompts)
                sink.append(tokens / (time.perf_counter() - start))
        row = {"batch": bs, "dist_infer_tok_s": statistics.median(ours), "hf_tok_s": statistics.median(theirs)}
        row["ratio"] = row["dist_infer_tok_s"] / row["hf_tok_s"]
        results.append(row)
        print(f"{bs:>5} {row['dist_infer_tok_s']:>17.1f} {row['hf_tok_s']:>10.1f} {row['ratio']:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "dtype": args.dtype, "new_tokens": args.new_tokens, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
