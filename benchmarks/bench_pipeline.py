"""Does micro-batching fill the pipeline? pp=2 with two batches in flight against one, same run.

    python benchmarks/bench_pipeline.py
    python benchmarks/bench_pipeline.py --pp 2 --executor ray --num-requests 48

With one batch in flight a stage idles while the other works on it; with one batch per stage, both work at
once on disjoint sets of requests. Same requests, same greedy outputs (checked); prints both throughputs
and their ratio.

Micro-batches split the running requests, so each stage reads its weights once per micro-batch rather than
once per step: the overlap pays when a micro-batch carries enough sequences for its compute to outweigh
that read (here, dozens), and little for a handful of decodes.
"""

from __future__ import annotations

import argparse
import random
import time

from workloads import token_prompts


def run(path: str, args, in_flight: int, prompts):
    from dist_infer import LLM, SamplingParams

    with LLM(model=path, dtype=args.dtype, pipeline_parallel_size=args.pp, distributed_executor_backend=args.executor,
             max_batches_in_flight=in_flight, max_num_seqs=args.max_num_seqs,
             pipeline_layer_partition=args.partition) as llm:
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outputs]
    return sum(map(len, tokens)) / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--executor", default="mp")
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--partition", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="layers per stage, comma-separated (default: even split)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from dist_infer.model_loader.resolve import resolve_model_path

    path = resolve_model_path(args.model)
    rng = random.Random(0)
    prompts = token_prompts(AutoTokenizer.from_pretrained(path), [rng.randint(32, 256) for _ in range(args.num_requests)])
    print(f"model={path}\npp={args.pp} executor={args.executor} requests={args.num_requests} "
          f"new_tokens={args.new_tokens} max_num_seqs={args.max_num_seqs}")
    one, tokens_one = run(path, args, 1, prompts)
    full, tokens_full = run(path, args, args.pp, prompts)
    assert tokens_one == tokens_full, "micro-batching changed the greedy outputs"
    print(f"1 batch in flight   : {one:7.1f} tok/s")
    print(f"{args.pp} batches in flight : {full:7.1f} tok/s")
    print(f"ratio               : {full / one:.2f}x")


if __name__ == "__main__":
    main()
