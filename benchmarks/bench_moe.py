"""Expert parallel against tensor-sliced experts at the same worker count, with HF ``generate`` as the baseline.

    python benchmarks/bench_moe.py
    python benchmarks/bench_moe.py --tp 2 --hidden 256 --layers 4 --experts 8 --new-tokens 32

Builds a random Mixtral-style model (fp32; by default 8 experts, top-2, hidden 256, 4 layers), then runs the
same greedy requests at batch 1 and batch 16 under ``mp`` at tensor-parallel size ``--tp``: once with every
expert sliced over the ranks, once with the experts spread whole (``enable_expert_parallel``). Prints tokens/s,
the bytes the workers' collectives handed in per engine step (``parallel_state``'s counters, summed over
workers), each worker's expert bytes, and the ratios against tensor-sliced experts and against HF.

With tensor-parallel attention both modes reduce the same [tokens, hidden] partial sums once per MoE layer, so
they move the same bytes; what differs is the work: sliced experts run every routed expert's matmuls on
thin slices on every rank, expert parallel runs whole matmuls for only the experts a rank holds.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def save_model(folder: str, args) -> str:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=512,
                           initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                           pad_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().save_pretrained(folder)
    return folder


def prompts(args, count: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(count)
    return torch.randint(0, args.vocab, (count, args.prompt_len), generator=g).tolist()


def run_engine(path: str, args, expert_parallel: bool) -> dict:
    from dist_infer import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    results = {}
    with LLM(model=path, skip_tokenizer_init=True, tensor_parallel_size=args.tp, distributed_executor_backend="mp",
             enable_expert_parallel=expert_parallel, kv_cache_memory=1 << 26, enable_prefix_caching=False) as llm:
        executor = llm.engine.executor
        results["expert_bytes"] = [r["expert_bytes"] for r in executor.collective_rpc("memory_report")]
        llm.generate([{"prompt_token_ids": p} for p in prompts(args, 2)], params, use_tqdm=False)  # warm-up
        for batch in args.batches:
            before = executor.collective_rpc("collective_bytes"), executor.collective_rpc("timing")
            start = time.perf_counter()
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts(args, batch)], params, use_tqdm=False)
            seconds = time.perf_counter() - start
            after = executor.collective_rpc("collective_bytes"), executor.collective_rpc("timing")
            moved = sum(sum(a.values()) - sum(b.values()) for a, b in zip(after[0], before[0]))
            steps = after[1][0]["steps"] - before[1][0]["steps"]
            tokens = [o.outputs[0].token_ids for o in outputs]
            results[batch] = dict(tok_s=sum(map(len, tokens)) / seconds, bytes_per_step=moved / steps, tokens=tokens)
    return results


def run_hf(path: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    results = {}
    with torch.inference_mode():
        hf.generate(torch.tensor(prompts(args, 2)), max_new_tokens=2, do_sample=False)  # warm-up
        for batch in args.batches:
            ids = torch.tensor(prompts(args, batch))
            start = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
            results[batch] = dict(tok_s=batch * args.new_tokens / seconds, tokens=out[:, ids.shape[1]:].tolist())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-moe-") as folder:
        path = save_model(folder, args)
        hf = run_hf(path, args)
        sliced = run_engine(path, args, expert_parallel=False)
        ep = run_engine(path, args, expert_parallel=True)
    print(f"Mixtral-style: hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top-2), "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; mp, tp={args.tp}, fp32, CPU")
    print(f"expert bytes per worker: sliced {sliced['expert_bytes']}, expert parallel {ep['expert_bytes']}")
    print(f"{'batch':>5} {'mode':<16} {'tok/s':>8} {'bytes/step':>11} {'vs sliced':>9} {'vs HF':>7} {'= HF':>5}")
    for batch in args.batches:
        base = sliced[batch]["tok_s"]
        print(f"{batch:>5} {'HF generate':<16} {hf[batch]['tok_s']:8.1f} {'-':>11} {hf[batch]['tok_s'] / base:8.2f}x "
              f"{1:6.2f}x {'':>5}")
        for name, result in (("tensor-sliced", sliced), ("expert parallel", ep)):
            r = result[batch]
            print(f"{batch:>5} {name:<16} {r['tok_s']:8.1f} {r['bytes_per_step']:11.0f} {r['tok_s'] / base:8.2f}x "
                  f"{r['tok_s'] / hf[batch]['tok_s']:6.2f}x {str(r['tokens'] == hf[batch]['tokens']):>5}")


if __name__ == "__main__":
    main()
