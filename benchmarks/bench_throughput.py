"""Serving throughput: 64 requests of mixed prompt lengths, 128 new tokens each.

    python benchmarks/bench_throughput.py
    python benchmarks/bench_throughput.py --num-requests 32 --new-tokens 64 --hf-batch-size 8

dist-infer gets every request at once and schedules them itself (continuous batching, chunked prefill,
paged KV cache). Hugging Face ``generate`` runs them in fixed batches of ``--hf-batch-size`` (left-padded,
each batch waits for its longest member). Both produce exactly ``--new-tokens`` greedy tokens per request
(EOS ignored) in the same process. Prints output tokens/s for each, the ratio dist-infer / HF, and
dist-infer's p50/p99 time to first token and inter-token latency (all requests arrive at time 0, so TTFT
includes queueing).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from workloads import percentile, token_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_infer import LLM, SamplingParams
    from dist_infer.model_loader.resolve import resolve_model_path

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rng = random.Random(0)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.num_requests)]
    prompts = token_prompts(tok, lengths)
    print(f"model={path}\ndtype={args.dtype} requests={args.num_requests} new_tokens={args.new_tokens} "
          f"prompt_len={min(lengths)}..{max(lengths)} (mean {sum(lengths) / len(lengths):.0f}) "
          f"threads={torch.get_num_threads()}")

    llm = LLM(model=path, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ours_s = time.perf_counter() - start
    ours_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.time_to_first_token for o in outputs]
    itl = [gap for o in outputs for gap in o.metrics.inter_token_latencies]
    stats = llm.engine.get_stats()
    del llm

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    hf.generation_config.eos_token_id = None

    def hf_batch(batch):
        padded = tok.pad({"input_ids": batch}, return_tensors="pt")
        with torch.inference_mode():
            out = hf.generate(**padded, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - padded["input_ids"].shape[1]) * len(batch)

    hf_batch(prompts[:2])  # warm-up
    start = time.perf_counter()
    hf_tokens = sum(hf_batch(prompts[i:i + args.hf_batch_size]) for i in range(0, len(prompts), args.hf_batch_size))
    hf_s = time.perf_counter() - start

    ours_tps, hf_tps = ours_tokens / ours_s, hf_tokens / hf_s
    result = {
        "dist_infer_tok_s": ours_tps, "hf_tok_s": hf_tps, "ratio": ours_tps / hf_tps,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "mean_tokens_per_step": stats.mean_tokens_per_step, "preemptions": stats.num_preemptions,
    }
    print(f"dist-infer : {ours_tokens} tokens in {ours_s:6.1f} s = {ours_tps:7.1f} tok/s")
    print(f"HF (b={args.hf_batch_size:<2}): {hf_tokens} tokens in {hf_s:6.1f} s = {hf_tps:7.1f} tok/s")
    print(f"ratio      : {result['ratio']:.2f}x")
    print(f"dist-infer TTFT p50 {result['ttft_p50_s'] * 1e3:8.1f} ms  p99 {result['ttft_p99_s'] * 1e3:8.1f} ms")
    print(f"dist-infer ITL  p50 {result['itl_p50_s'] * 1e3:8.1f} ms  p99 {result['itl_p99_s'] * 1e3:8.1f} ms")
    print(f"dist-infer mean tokens/step {stats.mean_tokens_per_step:.1f}, preemptions {stats.num_preemptions}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, **vars(args), **result}, f, indent=2)


if __name__ == "__main__":
    main()
