"""Serving benchmark: a request mix at set concurrencies against a running ``dist-infer serve``.

    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --concurrency 1 8 32
    python benchmarks/bench_serving.py --launch --concurrency 1 8 32        # starts (and stops) a server itself

Each level keeps ``concurrency`` streaming requests in flight (chat and completions, prompts of mixed
lengths) until ``--requests-per-level`` (default: 4 x concurrency, at least 16) have finished. Reports
output throughput, time to first token (TTFT), time per output token after the first (TPOT) and
inter-token latency (ITL) at p50/p90/p99; writes them as JSON and plots latency against throughput (PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import httpx

from workloads import QUESTIONS, percentile

_TEXT = ("Serving language models well means sharing scarce hardware among many users without making "
         "anyone wait too long. ")


def _requests(model: str, n: int, max_tokens: int, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            prompt = _TEXT * rng.randint(1, 12) + QUESTIONS[i % len(QUESTIONS)]
            out.append(("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens}))
        else:
            messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            out.append(("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": max_tokens}))
    return out


async def _one(client: httpx.AsyncClient, base: str, path: str, body: dict) -> dict:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", base + path, json=body) as response:
        if response.status_code != 200:
            return {"error": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text") or choice.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps:
        return {"error": "no tokens"}
    ttft = stamps[0] - start
    return {"ttft": ttft, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens,
            "tpot": (end - stamps[0]) / max(1, tokens - 1)}


async def _level(base: str, model: str, concurrency: int, total: int, max_tokens: int, headers: dict) -> dict:
    work = _requests(model, total, max_tokens, seed=concurrency)
    results: list[dict] = []
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=900, limits=limits, headers=headers) as client:
        async def run(path, body):
            async with gate:
                results.append(await _one(client, base, path, body))

        start = time.perf_counter()
        await asyncio.gather(*(run(p, b) for p, b in work))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    itl = [g for r in ok for g in r["itl"]]
    row = {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
           "output_tokens": sum(r["tokens"] for r in ok), "seconds": wall}
    row["throughput_tok_s"] = row["output_tokens"] / wall
    for name, values in (("ttft", [r["ttft"] for r in ok]), ("tpot", [r["tpot"] for r in ok]), ("itl", itl)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = percentile(values, q) * 1e3
    return row


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput = [r["throughput_tok_s"] for r in rows]
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "tpot", "time per output token")):
        for q, style in ((50, "o-"), (90, "s--"), (99, "^:")):
            ax.plot(throughput, [r[f"{metric}_p{q}_ms"] for r in rows], style, label=f"p{q}")
        for r in rows:
            ax.annotate(f"c={r['concurrency']}", (r["throughput_tok_s"], r[f"{metric}_p50_ms"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("dist-infer serving: latency against throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _launch(extra: list[str]) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from dist_infer.distributed.utils import get_open_port

    port = get_open_port()
    proc = subprocess.Popen([sys.executable, "-m", "dist_infer.entrypoints.cli", "serve", "--port", str(port), *extra],
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.5)
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--launch", action="store_true", help="start a dist-infer server for the run")
    parser.add_argument("--server-args", default="", help="extra `dist-infer serve` flags with --launch")
    parser.add_argument("--api-key", default=os.environ.get("DIST_INFER_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-level", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", default="bench_serving", help="writes OUTPUT.json and OUTPUT.png")
    args = parser.parse_args()

    proc = None
    base = args.base_url.rstrip("/")
    if args.launch:
        proc, base = _launch(args.server_args.split())
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = httpx.get(base + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        rows = []
        print(f"server {base} model {model}")
        print(f"{'conc':>4} {'reqs':>5} {'tok/s':>8} {'TTFT p50/p90/p99 ms':>24} {'TPOT p50/p90/p99 ms':>22} "
              f"{'ITL p50/p90/p99 ms':>22}")
        for c in args.concurrency:
            total = args.requests_per_level or max(16, 4 * c)
            row = asyncio.run(_level(base, model, c, total, args.max_tokens, headers))
            rows.append(row)
            trio = lambda m: "/".join(f"{row[f'{m}_p{q}_ms']:.0f}" for q in (50, 90, 99))  # noqa: E731
            print(f"{c:>4} {row['requests']:>5} {row['throughput_tok_s']:>8.1f} {trio('ttft'):>24} "
                  f"{trio('tpot'):>22} {trio('itl'):>22}" + (f"  errors={row['errors']}" if row["errors"] else ""))
        with open(args.output + ".json", "w") as f:
            json.dump({"base_url": base, "model": model, "max_tokens": args.max_tokens, "levels": rows}, f, indent=2)
        _plot(rows, args.output + ".png")
        print(f"wrote {args.output}.json and {args.output}.png")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
