"""Failover benchmark: what worker deaths cost a ``dist-infer serve`` with data-parallel replicas.

    python benchmarks/bench_failover.py                  # the embedded SmolLM2-135M-Instruct (~5 min, 2 cores)
    python benchmarks/bench_failover.py --quick          # a tiny random model with SmolLM2's tokenizer
    python benchmarks/bench_failover.py --model PATH     # any model dist-infer serves

Part 1, faults: one ``--executor mp --dp 2`` server answers the same streaming workload twice in one run
(``--requests`` completions, half greedy and half seeded sampling, EOS ignored, ``--concurrency`` in flight),
first undisturbed, then while ``--kills`` worker processes are SIGKILLed (each on a serving replica, at set
fractions of the undisturbed run's length). Prints throughput, end-to-end latency and time to first token for
both runs and their ratios, requests lost (must be 0), outputs that differ from the undisturbed run (must be 0),
and per kill the time to detect it (kill -> the server logs "replica N failed") and to rebuild the replica
(failed -> the server logs "replica N rebuilt"; also the engine's own ``rebuild_seconds`` from
``/admin/replicas``). Log timestamps have millisecond resolution and come from the same clock as the kill's.

Part 2, autoscaling: a server with ``--min-replicas 1 --max-replicas 3`` and short delays under a load that
rises, holds and falls (closed-loop concurrency following a schedule), with one worker SIGKILLed at the peak.
Every ~0.5 s it samples the replicas' states and queues (``/admin/replicas``: the scheduler counters that
``/metrics`` exports as ``dist_infer_num_requests_waiting`` / ``_running``; ``--queue-from-metrics`` reads them
from ``/metrics`` itself) and the tokens streamed (throughput), and plots the three against time (``--figure``).
Scraping ``/metrics`` this often is avoided by default because each scrape asks every worker for its timings on
the engine thread, which stalls every replica while a starting replica's workers are still busy initializing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from workloads import QUESTIONS, percentile  # noqa: E402

_FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "failover.png")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ dist_infer\.replicas: replica (\d+) "
                       r"(failed|rebuilt|started|drained and stopped|draining)\b(.*)$", re.M)


# ---- the server ------------------------------------------------------------------------------------------
class Server:
    """``dist-infer serve`` on a free loopback port; its log goes to a file that ``log()`` reads."""

    def __init__(self, args: list[str], replicas: int):
        from dist_infer.distributed.utils import get_open_port

        self.port = get_open_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile("w+", prefix="bench-failover-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "dist_infer.entrypoints.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited during start-up:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.base + "/ready", timeout=60).status_code == 200:
                    self.model = httpx.get(self.base + "/v1/models", timeout=30).json()["data"][0]["id"]
                    self.per_replica = len(self.workers()) // replicas  # tp x pp
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit("the server did not start")

    def log(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def workers(self) -> list:
        """Live worker processes (spawned children running the worker entry point)."""
        import psutil

        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return sorted(found, key=lambda p: p.pid)

    def replica_events(self) -> list[tuple[float, int, str, str]]:
        """(unix time, replica, event, rest of the line) for each replica line of the log."""
        events = []
        for stamp, replica, what, rest in _LOG_LINE.findall(self.log()):
            t = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged
            events.append((t, int(replica), what, rest))
        return events

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()
        os.unlink(self._log.name)


async def replicas(client: httpx.AsyncClient, base: str) -> list[dict]:
    return (await client.get(base + "/admin/replicas", timeout=60)).json()["replicas"]


async def kill_a_serving_worker(server: Server, client: httpx.AsyncClient, rng: random.Random,
                                min_serving: int = 1, timeout: float = 300.0, still_wanted=lambda: True) -> dict | None:
    """Waits until every replica that is not stopped serves (so every live worker belongs to a serving
    replica: none is starting, failed or draining) and at least ``min_serving`` do, then SIGKILLs one worker.
    None when ``still_wanted()`` turns false meanwhile (the load is over: an idle replica would not even notice)."""
    deadline = time.monotonic() + timeout
    while True:
        if not still_wanted():
            return None
        reports = await replicas(client, server.base)
        live = [r for r in reports if r["state"] != "stopped"]
        serving = [r for r in live if r["state"] == "serving"]
        workers = server.workers()
        if len(serving) == len(live) >= min_serving and len(workers) == len(serving) * server.per_replica:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no moment with every replica serving: {reports}")
        await asyncio.sleep(0.1)
    victim = rng.choice(workers)
    at = time.time()
    victim.kill()
    return {"pid": victim.pid, "at": at, "at_mono": time.monotonic()}


def kill_timings(server: Server, kills: list[dict], reports: list[dict]) -> list[dict]:
    """Per kill: which replica failed, detection (kill -> 'failed' logged), rebuild (failed -> 'rebuilt' logged)
    and the engine's own rebuild_seconds for it."""
    events = server.replica_events()
    seen_rebuilds: dict[int, int] = {}
    rows = []
    for kill in kills:
        failed = next(((t, d) for t, d, what, _ in events if what == "failed" and t >= kill["at"] - 0.002), None)
        row = {"pid": kill["pid"], "replica": None, "detect_s": None, "rebuild_s": None, "engine_rebuild_s": None}
        if failed is not None:
            t_fail, replica = failed
            row.update(replica=replica, detect_s=max(0.0, t_fail - kill["at"]))
            back = next((t for t, d, what, _ in events if d == replica and what == "rebuilt" and t >= t_fail), None)
            if back is not None:
                row["rebuild_s"] = back - t_fail
            n = seen_rebuilds.get(replica, 0)
            seconds = next((r["rebuild_seconds"] for r in reports if r["replica"] == replica), [])
            if n < len(seconds):
                row["engine_rebuild_s"] = seconds[n]
            seen_rebuilds[replica] = n + 1
        rows.append(row)
    return rows


# ---- the workload ----------------------------------------------------------------------------------------
def workload(model: str, n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        prompt = QUESTIONS[i % len(QUESTIONS)] + " " + " ".join(rng.choice(QUESTIONS).split()[:rng.randint(2, 12)])
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        body.update({"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "top_p": 0.95, "seed": 10_000 + i})
        bodies.append(body)
    return bodies


async def stream(client: httpx.AsyncClient, base: str, body: dict, on_token=None) -> dict:
    """One streamed completion: its text, token count, TTFT, end-to-end latency, and whether it ended well
    (a finish_reason, usage, then [DONE], no error event)."""
    start = time.perf_counter()
    out = {"text": "", "tokens": 0, "ttft": None, "finish": None, "done": False, "error": None}
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                out["error"] = f"HTTP {response.status_code}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"] = event["error"].get("code") or "error"
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - start
                        out["text"] += choice["text"]
                        if on_token is not None:
                            on_token()
                    if choice.get("finish_reason"):
                        out["finish"] = choice["finish_reason"]
    except (httpx.HTTPError, ValueError) as e:
        out["error"] = type(e).__name__
    out["e2e"] = time.perf_counter() - start
    out["ok"] = out["error"] is None and out["done"] and out["finish"] is not None
    return out


async def closed_loop(server: Server, bodies: list[dict], concurrency: int, kill_at: list[float],
                      seed: int) -> dict:
    """Runs ``bodies`` with ``concurrency`` in flight; SIGKILLs a worker at each time in ``kill_at`` (seconds
    from the start; a kill waits until every replica serves, and is skipped once too little work is left)."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    pending = {"left": len(bodies)}
    kills: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def one(body):
            async with gate:
                result = await stream(client, server.base, body)
            pending["left"] -= 1
            return result

        async def killer(start):
            for t in kill_at:
                await asyncio.sleep(max(0.0, start + t - time.monotonic()))
                kill = await kill_a_serving_worker(server, client, rng, min_serving=2,
                                                   still_wanted=lambda: pending["left"] >= concurrency)
                if kill is None:
                    print(f"  (the kill planned at {t:.1f}s was skipped: the workload was nearly done before "
                          f"both replicas served again)")
                    continue
                kill["t"] = time.monotonic() - start
                kills.append(kill)

        start = time.monotonic()
        kill_task = asyncio.create_task(killer(start))
        results = await asyncio.gather(*(one(b) for b in bodies))
        wall = time.monotonic() - start
        kill_task.cancel()
        # Every replica back (the last rebuild may still be under way).
        deadline = time.monotonic() + 180
        while kills and time.monotonic() < deadline:
            reports = await replicas(client, server.base)
            if all(r["state"] == "serving" for r in reports) and sum(r["rebuilds"] for r in reports) >= len(kills):
                break
            await asyncio.sleep(0.2)
        reports = await replicas(client, server.base)
    return {"results": results, "wall": wall, "kills": kills, "reports": reports}


def summarize(run: dict) -> dict:
    results, wall = run["results"], run["wall"]
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "lost": len(results) - len(ok), "seconds": wall, "tok_s": tokens / wall,
            "req_s": len(ok) / wall,
            "e2e_p50": percentile([r["e2e"] for r in ok], 50), "e2e_p99": percentile([r["e2e"] for r in ok], 99),
            "ttft_p50": percentile([r["ttft"] for r in ok if r["ttft"] is not None], 50),
            "ttft_p99": percentile([r["ttft"] for r in ok if r["ttft"] is not None], 99)}


def part_faults(model_args: list[str], args) -> dict:
    print(f"\n== Part 1: the same workload undisturbed and with {args.kills} worker SIGKILLs "
          f"(--executor mp --dp 2, {args.requests} streaming requests, {args.concurrency} in flight, "
          f"{args.max_tokens} tokens each) ==")
    t0 = time.monotonic()
    server = Server(model_args + ["--executor", "mp", "--dp", "2", "--worker-timeout", str(args.worker_timeout),
                                  "--replica-restart-backoff", "0.2"], replicas=2)
    print(f"server up in {time.monotonic() - t0:.1f}s ({server.model})")
    try:
        bodies = workload(server.model, args.requests, args.max_tokens, seed=args.seed)
        base = asyncio.run(closed_loop(server, bodies, args.concurrency, [], args.seed))
        # Kills spread over the run: the first early, the next ones once the previous replica is back.
        fractions = [0.12 + 0.5 * k / max(1, args.kills - 1) for k in range(args.kills)] if args.kills > 1 else [0.2]
        faulted = asyncio.run(closed_loop(server, bodies, args.concurrency, [f * base["wall"] for f in fractions],
                                          args.seed + 1))
        timings = kill_timings(server, faulted["kills"], faulted["reports"])
    finally:
        server.stop()
    rows = {"undisturbed": summarize(base), "with kills": summarize(faulted)}
    same = sum(a["ok"] and b["ok"] and a["text"] == b["text"] for a, b in zip(base["results"], faulted["results"]))
    print(f"{'run':<12} {'reqs':>5} {'lost':>5} {'s':>7} {'tok/s':>8} {'req/s':>7} {'e2e p50/p99 s':>15} "
          f"{'TTFT p50/p99 s':>15}")
    for name, r in rows.items():
        print(f"{name:<12} {r['requests']:>5} {r['lost']:>5} {r['seconds']:>7.1f} {r['tok_s']:>8.1f} "
              f"{r['req_s']:>7.2f} {r['e2e_p50']:>7.2f}/{r['e2e_p99']:<7.2f} {r['ttft_p50']:>7.2f}/{r['ttft_p99']:<7.2f}")
    a, b = rows["undisturbed"], rows["with kills"]
    print(f"{'ratio':<12} {'':>5} {'':>5} {b['seconds'] / a['seconds']:>7.2f} {b['tok_s'] / a['tok_s']:>8.2f} "
          f"{b['req_s'] / a['req_s']:>7.2f} {b['e2e_p50'] / a['e2e_p50']:>7.2f}/{b['e2e_p99'] / a['e2e_p99']:<7.2f} "
          f"{b['ttft_p50'] / a['ttft_p50']:>7.2f}/{b['ttft_p99'] / a['ttft_p99']:<7.2f}   (with kills / undisturbed)")
    print(f"outputs identical to the undisturbed run: {same}/{len(bodies)} (greedy and seeded sampling)")
    migrations = sum(r["migrations"] for r in faulted["reports"])
    print(f"requests moved to the other replica: {migrations}")
    print(f"{'kill':>4} {'at s':>6} {'replica':>7} {'detect ms':>10} {'rebuild s':>10} {'engine rebuild s':>17}")
    for i, (kill, t) in enumerate(zip(faulted["kills"], timings)):
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        detect = None if t["detect_s"] is None else t["detect_s"] * 1e3
        print(f"{i + 1:>4} {kill['t']:>6.1f} {fmt(t['replica'], 'd'):>7} {fmt(detect, '.0f'):>10} "
              f"{fmt(t['rebuild_s'], '.2f'):>10} {fmt(t['engine_rebuild_s'], '.2f'):>17}")
    return {"runs": rows, "identical_outputs": same, "migrations": migrations, "kills": timings,
            "kill_times_s": [k["t"] for k in faulted["kills"]]}


# ---- part 2: a load ramp with autoscaling and a kill at the peak ----------------------------------------
def _concurrency_at(t: float, peak: int, rise: float, hold: float, fall: float) -> int:
    if t < rise:
        return max(1, round(1 + (peak - 1) * t / rise))
    if t < rise + hold:
        return peak
    if t < rise + hold + fall:
        return max(1, round(peak - (peak - 1) * (t - rise - hold) / fall))
    return 1


async def ramp(server: Server, args, model: str) -> dict:
    rise, hold, fall, tail = args.ramp
    total = rise + hold + fall + tail
    rng = random.Random(args.seed)
    bodies = workload(model, 100_000, args.max_tokens, seed=args.seed)
    samples, kills = [], []
    state = {"active": 0, "tokens": 0, "next": 0, "done": 0, "lost": 0}
    tasks = set()
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=args.peak + 16)) as client:
        def token():
            state["tokens"] += 1

        async def one(body):
            result = await stream(client, server.base, body, token)
            state["active"] -= 1
            state["done"] += 1
            state["lost"] += 0 if result["ok"] else 1

        async def sampler(start):
            last_tokens, last_t = 0, start
            while True:
                await asyncio.sleep(0.5)
                now = time.monotonic()
                try:
                    reports = await replicas(client, server.base)
                    if args.queue_from_metrics:
                        metrics = (await client.get(server.base + "/metrics", timeout=30)).text
                except httpx.HTTPError:
                    continue
                if args.queue_from_metrics:
                    waiting, running = (sum(float(v) for v in re.findall(
                        rf"^dist_infer_num_requests_{name}\{{[^}}]*\}} (\S+)$", metrics, re.M))
                        for name in ("waiting", "running"))
                else:  # the same scheduler counters, without /metrics' round trip to every worker
                    waiting = sum(r["waiting"] for r in reports)
                    running = sum(r["running"] for r in reports)
                counts = {}
                for r in reports:
                    counts[r["state"]] = counts.get(r["state"], 0) + 1
                samples.append({"t": now - start, "states": counts, "tok_s": (state["tokens"] - last_tokens) /
                                (now - last_t), "waiting": waiting, "running": running,
                                "offered": _concurrency_at(now - start, args.peak, rise, hold, fall)})
                last_tokens, last_t = state["tokens"], now

        async def killer(start):
            await asyncio.sleep(rise + hold / 2)
            kill = await kill_a_serving_worker(server, client, rng, min_serving=2, timeout=hold)
            kill["t"] = time.monotonic() - start
            kills.append(kill)

        start = time.monotonic()
        sample_task = asyncio.create_task(sampler(start))
        kill_task = asyncio.create_task(killer(start))
        while time.monotonic() - start < total:
            want = _concurrency_at(time.monotonic() - start, args.peak, rise, hold, fall)
            while state["active"] < want:
                state["active"] += 1
                task = asyncio.create_task(one(bodies[state["next"]]))
                state["next"] += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        sample_task.cancel()
        if not kill_task.done():
            kill_task.cancel()
        elif kill_task.exception() is not None:
            print(f"  the kill did not happen: {kill_task.exception()}")
        reports = await replicas(client, server.base)
    return {"samples": samples, "kills": kills, "requests": state["next"], "lost": state["lost"],
            "reports": reports}


def part_ramp(model_args: list[str], args) -> dict:
    rise, hold, fall, tail = args.ramp
    print(f"\n== Part 2: autoscaling 1..3 replicas under a load ramp (concurrency 1 -> {args.peak} over {rise:.0f}s, "
          f"held {hold:.0f}s, back to 1 over {fall:.0f}s, then {tail:.0f}s), one worker SIGKILL at the peak ==")
    policy = ["--executor", "mp", "--min-replicas", "1", "--max-replicas", "3", "--initial-replicas", "1",
              "--target-ongoing-requests", "4", "--upscale-delay", "2", "--downscale-delay", "6",
              "--look-back-period", "2", "--drain-timeout", "10", "--worker-timeout", str(args.worker_timeout),
              "--replica-restart-backoff", "0.2"]
    print("server flags: " + " ".join(policy))
    server = Server(model_args + policy, replicas=1)
    try:
        result = asyncio.run(ramp(server, args, server.model))
        timings = kill_timings(server, result["kills"], result["reports"])
        scaling = [(t, d, what) for t, d, what, _ in server.replica_events() if what in ("started", "draining",
                                                                                        "drained and stopped")]
    finally:
        server.stop()
    samples = result["samples"]
    print(f"requests: {result['requests']}, lost: {result['lost']}")
    if samples:
        most = max(samples, key=lambda s: s["states"].get("serving", 0))
        print(f"replicas serving: max {most['states'].get('serving', 0)} at {most['t']:.1f}s, "
              f"at the end {samples[-1]['states']}")
        print(f"throughput tok/s (0.5 s windows): max {max(s['tok_s'] for s in samples):.0f}; "
              f"queue (waiting) max {max(s['waiting'] for s in samples):.0f}")
    t0 = min((k["at"] for k in result["kills"]), default=0.0)
    for t, d, what in scaling:
        print(f"  log: replica {d} {what}" + (f" ({t - t0:+.1f}s from the kill)" if result["kills"] else ""))
    for kill, t in zip(result["kills"], timings):
        detect = "-" if t["detect_s"] is None else f"{t['detect_s'] * 1e3:.0f} ms"
        rebuild = "-" if t["rebuild_s"] is None else f"{t['rebuild_s']:.2f} s"
        print(f"kill at {kill['t']:.1f}s: replica {t['replica']}, detected in {detect}, rebuilt in {rebuild}")
    _plot(samples, result["kills"], timings, args.figure, args)
    print(f"wrote {args.figure}")
    return {"samples": samples, "kill_times_s": [k["t"] for k in result["kills"]], "kills": timings,
            "requests": result["requests"], "lost": result["lost"]}


def _plot(samples: list[dict], kills: list[dict], timings: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    states = ["serving", "starting", "draining", "failed"]
    colors = {"serving": "tab:green", "starting": "tab:blue", "draining": "tab:orange", "failed": "tab:red"}
    axes[0].stackplot(t, *[[s["states"].get(k, 0) for s in samples] for k in states], labels=states,
                      colors=[colors[k] for k in states], step="post", alpha=0.8)
    axes[0].plot(t, [s["offered"] / 4 for s in samples], "k:", label="offered concurrency / target (4)")
    axes[0].set_ylabel("replicas")
    axes[0].set_ylim(0, 4.2)
    axes[0].legend(loc="upper left", fontsize=8, ncol=5)
    axes[1].plot(t, [s["tok_s"] for s in samples], color="tab:purple")
    axes[1].set_ylabel("tokens/s streamed")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(t, [s["waiting"] for s in samples], label="waiting (queue)", color="tab:brown")
    axes[2].plot(t, [s["running"] for s in samples], label="running", color="tab:gray", alpha=0.7)
    axes[2].plot(t, [s["offered"] for s in samples], "k:", label="offered concurrency")
    axes[2].set_ylabel("requests")
    axes[2].set_xlabel("seconds")
    axes[2].legend(loc="upper left", fontsize=8)
    for kill, timing in zip(kills, timings):
        for ax in axes:
            ax.axvline(kill["t"], color="red", linestyle="--", linewidth=1)
            if timing.get("rebuild_s") is not None and timing.get("detect_s") is not None:
                ax.axvspan(kill["t"] + timing["detect_s"], kill["t"] + timing["detect_s"] + timing["rebuild_s"],
                           color="red", alpha=0.08)
        axes[0].annotate("worker SIGKILL", (kill["t"], 3.3), color="red", fontsize=8, xytext=(4, 0),
                         textcoords="offset points")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"dist-infer failover and autoscaling ({args.model_label}; min 1, max 3 replicas, target 4 "
                 f"ongoing requests each)\nred: the kill, shaded: replica failed until rebuilt", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


# ---- main -------------------------------------------------------------------------------------------------
def tiny_model(folder: str) -> str:
    """A small random Llama that speaks SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_infer.model_loader.resolve import resolve_model_path

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer = resolve_model_path(None)
    for name in os.listdir(tokenizer):
        if name.startswith("tokenizer") or name.endswith(".jinja") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(tokenizer, name), os.path.join(folder, name))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--quick", action="store_true", help="a tiny random model (same tokenizer), shorter ramp")
    parser.add_argument("--server-args", default="", help="more `dist-infer serve` flags for both servers")
    parser.add_argument("--requests", type=int, default=None, help="part 1 (default 96; --quick 240)")
    parser.add_argument("--concurrency", type=int, default=8, help="part 1: requests in flight")
    parser.add_argument("--max-tokens", type=int, default=None, help="per request (default 32; --quick 48)")
    parser.add_argument("--kills", type=int, default=2, help="part 1: worker SIGKILLs")
    parser.add_argument("--peak", type=int, default=12, help="part 2: the peak concurrency")
    parser.add_argument("--ramp", type=float, nargs=4, default=None, metavar=("RISE", "HOLD", "FALL", "TAIL"),
                        help="part 2 phases in seconds (default 15 30 12 14; --quick 10 24 8 12)")
    parser.add_argument("--worker-timeout", type=float, default=10.0, help="the step timeout (hang detection)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-faults", action="store_true")
    parser.add_argument("--skip-ramp", action="store_true")
    parser.add_argument("--queue-from-metrics", action="store_true",
                        help="part 2: read the queue from /metrics (num_requests_waiting) rather than /admin/replicas; "
                        "note that each /metrics scrape waits for every worker, a starting one included")
    parser.add_argument("--figure", default=_FIGURE)
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    args.requests = args.requests or (240 if args.quick else 96)
    args.max_tokens = args.max_tokens or (48 if args.quick else 32)
    args.ramp = args.ramp or ([10, 24, 8, 12] if args.quick else [15, 30, 12, 14])

    scratch = tempfile.mkdtemp(prefix="bench-failover-")
    try:
        model = args.model
        if args.quick and model is None:
            model = tiny_model(os.path.join(scratch, "tiny-random-llama"))
        args.model_label = "tiny random Llama" if args.quick and args.model is None else (
            os.path.basename(model.rstrip("/")) if model else "SmolLM2-135M-Instruct")
        model_args = (["--model", model] if model else []) + args.server_args.split()
        print(f"model: {args.model_label}; {os.cpu_count()} CPU cores")
        out = {}
        start = time.monotonic()
        if not args.skip_faults:
            out["faults"] = part_faults(model_args, args)
        if not args.skip_ramp:
            out["ramp"] = part_ramp(model_args, args)
        print(f"\ntotal {time.monotonic() - start:.0f}s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
