"""What prefix caching saves: two waves of requests sharing a 512-token system prompt.

    python benchmarks/bench_prefix_caching.py

Wave 1 fills the cache with the system prompt; wave 2 asks different questions behind the same system
prompt. For each wave, with prefix caching on and off: prompt tokens actually computed, the prefix-cache hit
rate, and the mean time to first token (each wave's requests arrive together).
"""

from __future__ import annotations

import argparse
import statistics

from workloads import QUESTIONS, token_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--wave-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    from dist_infer import LLM, SamplingParams
    from dist_infer.model_loader.resolve import resolve_model_path

    path = resolve_model_path(args.model)
    print(f"model={path}\nsystem prompt {args.system_tokens} tokens, {args.wave_size} requests per wave")
    print(f"{'caching':>8} {'wave':>4} {'prompt tok':>10} {'computed':>9} {'hit rate':>8} {'mean TTFT':>10}")
    for caching in (True, False):
        llm = LLM(model=path, enable_prefix_caching=caching)
        tok = llm.get_tokenizer()
        system = token_prompts(tok, [args.system_tokens], seed=1)[0]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        waves = [QUESTIONS[:args.wave_size], QUESTIONS[args.wave_size:2 * args.wave_size]]
        for number, questions in enumerate(waves, 1):
            prompts = [{"prompt_token_ids": system + tok.encode(q, add_special_tokens=False)} for q in questions]
            before = llm.engine.get_stats()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            after = llm.engine.get_stats()
            queried = after.prefix_cache_queries - before.prefix_cache_queries
            hits = after.prefix_cache_hits - before.prefix_cache_hits
            computed = after.prompt_tokens_computed - before.prompt_tokens_computed
            ttft = statistics.mean(o.metrics.time_to_first_token for o in outputs)
            total = sum(len(p["prompt_token_ids"]) for p in prompts)
            print(f"{'on' if caching else 'off':>8} {number:>4} {total:>10} {computed:>9} {hits / queried:>8.1%} "
                  f"{ttft * 1e3:>8.0f}ms")
        del llm


if __name__ == "__main__":
    main()
