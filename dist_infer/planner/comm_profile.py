"""Communication costs for the planner: collectives and pipeline transfers measured on this machine with the
backend in use (gloo on the CPU, NCCL on CUDA), and a ring-algorithm model where nothing was measured.

A profile times, for each group size n (ranks 0..n-1, one torch world per size built by ``parallel_state``):

    all_reduce   of an fp32 tensor of B bytes on every rank
    all_gather   into an fp32 tensor of B bytes (each rank hands in B / n)
    send_recv    rank 0 ``isend`` -> rank 1 ``recv`` of B bytes (the pipeline's pattern), timed on the receiver

Each figure is the median over ``repeats`` runs (after 2 warm-ups) of the slowest rank's time, every run
starting from a barrier. ``CommModel`` turns a profile (or a datasheet's link figures) into seconds per call.
"""

from __future__ import annotations

import bisect
import json
import os
import queue
import statistics
import time
import traceback

OPS = ("all_reduce", "all_gather", "send_recv")
_WARMUPS = 2
_PAIR = 2  # send_recv is always between two ranks: its figures are keyed by this group size


def default_sizes() -> list[int]:
    """Message sizes from 4 KiB (a decode step's activations) to 64 MiB (a long prefill's), x4 steps."""
    return [4096 * 4**i for i in range(8)]


def ring_factors(op: str, n: int) -> tuple[float, float]:
    """(latency factor, bandwidth factor) of the ring algorithms over ``n`` ranks: seconds =
    lat_factor * latency + bw_factor * B / bandwidth, B the input bytes on one rank for all_reduce and
    send_recv and the gathered tensor's bytes for all_gather."""
    if op == "all_reduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n
    if op == "all_gather":
        return float(n - 1), (n - 1) / n
    if op == "send_recv":
        return 1.0, 1.0
    raise ValueError(f"unknown communication op {op!r}; valid ops: {', '.join(OPS)}")


# --------------------------------------------------------------------------------------------- measuring


def _time_op(op: str, group, nbytes: int, device, repeats: int) -> tuple[int, list[float]]:
    """(bytes the figure is for, seconds of each run on this rank) of ``op`` on ``group``."""
    import torch
    import torch.distributed as dist

    n, me = group.world_size, group.rank_in_group
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if op == "all_reduce":
        x = torch.ones(max(1, nbytes // 4), device=device)
        run, table_bytes = (lambda: group.all_reduce(x)), x.numel() * 4
    elif op == "all_gather":
        x = torch.ones(max(1, nbytes // 4 // n), device=device)
        out = torch.empty(x.numel() * n, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        run, table_bytes = (lambda: gather(out, x, group=group.device_group)), out.numel() * 4
    else:
        x = torch.ones(max(1, nbytes // 4), device=device)
        table_bytes = x.numel() * 4
        if me == 0:
            run = lambda: dist.isend(x, dst=group.ranks[1], group=group.device_group).wait()  # noqa: E731
        elif me == 1:
            run = lambda: dist.recv(x, src=group.ranks[0], group=group.device_group)  # noqa: E731
        else:  # outside the pair, but in the barriers
            run = lambda: None  # noqa: E731
    times = []
    for i in range(_WARMUPS + repeats):
        sync()
        dist.barrier(group=group.cpu_group)
        start = time.perf_counter()
        run()
        sync()
        if i >= _WARMUPS:
            times.append(time.perf_counter() - start)
    # Only the receiver sees a transfer end: the sender's wait() returns once its buffer is handed off.
    return table_bytes, times if op != "send_recv" or me == 1 else []


def _child(rank: int, group_sizes: list[int], sizes: list[int], device: str, repeats: int, threads: int,
           init_prefix: str, timeout_s: float, parent_pid: int, events) -> None:
    from dist_infer.executor.multiproc import _die_with_parent

    _die_with_parent(parent_pid)
    step = ("start-up", 0, 0)
    try:
        import torch

        from dist_infer.distributed.layout import RankLayout
        from dist_infer.distributed.parallel_state import destroy_distributed, get_tp_group, init_distributed

        torch.set_num_threads(threads)
        dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
        pair_size = min(group_sizes)
        for n in group_sizes:
            if rank >= n:
                continue
            step = ("init", n, 0)
            events.put(("step", rank, step))
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            init_distributed(RankLayout(tp=n, pp=1, dp=1), rank, f"{init_prefix}-{n}", dev, timeout_s)
            ops = OPS if n == pair_size else OPS[:2]
            for nbytes in sizes:
                for op in ops:
                    step = (op, n, nbytes)
                    events.put(("step", rank, step))
                    table_bytes, times = _time_op(op, get_tp_group(), nbytes, dev, repeats)
                    if times:
                        events.put(("times", rank, ((op, _PAIR if op == "send_recv" else n, table_bytes), times)))
            destroy_distributed()
        events.put(("done", rank, None))
    except BaseException:
        events.put(("error", rank, (step, traceback.format_exc())))


def _describe(step: tuple) -> str:
    op, n, nbytes = step
    return op if not n else f"{op} over {n} ranks" + (f" of {nbytes} bytes" if nbytes else "")


def _collect(procs: list, events, timeout_s: float) -> dict:
    """Every rank's run times per (op, group size, bytes); RuntimeError naming the step a rank failed or hung in."""
    deadline = time.monotonic() + timeout_s
    steps = {rank: ("start-up", 0, 0) for rank in range(len(procs))}
    done: set[int] = set()
    runs: dict[tuple, list[list[float]]] = {}
    while len(done) < len(procs):
        try:
            kind, rank, payload = events.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            for rank, p in enumerate(procs):
                if rank not in done and p.exitcode is not None:
                    raise RuntimeError(f"profiling rank {rank} exited with code {p.exitcode} during "
                                       f"{_describe(steps[rank])}") from None
            if time.monotonic() >= deadline:
                stuck = "; ".join(f"rank {r}: {_describe(s)}" for r, s in steps.items() if r not in done)
                raise RuntimeError(f"communication profile timed out after {timeout_s:g} s ({stuck})") from None
            continue
        if kind == "step":
            steps[rank] = payload
        elif kind == "times":
            key, times = payload
            runs.setdefault(key, []).append(times)
        elif kind == "error":
            step, trace = payload
            raise RuntimeError(f"profiling rank {rank} failed during {_describe(step)}:\n{trace}")
        else:
            done.add(rank)
    return runs


def profile_collectives(group_sizes: list[int], sizes_bytes: list[int], device: str = "cpu",
                        repeats: int = 10, threads_per_rank: int = 1, timeout_s: float = 120) -> dict:
    """Measures all_reduce, all_gather (per group size) and send_recv (between ranks 0 and 1) in
    ``max(group_sizes)`` spawned processes, ``threads_per_rank`` torch threads each, and returns

        {"backend": "gloo", "device": "cpu", "threads_per_rank": 1,
         "ops": {"all_reduce": {"2": {"bytes": [...], "seconds": [...]}, "3": {...}},
                 "all_gather": {...}, "send_recv": {"2": {...}}}}

    ``bytes``: the all_reduce / send_recv tensor, the all_gather *output* (rounded down to whole fp32 elements,
    n of them for all_gather). A child's failure or a timeout is a RuntimeError naming the op and size."""
    import torch.multiprocessing as mp

    from dist_infer.distributed.utils import LocalRendezvous

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
    if not group_sizes or min(group_sizes) < 2:
        raise ValueError(f"group sizes must be at least 2 (one rank communicates with no one), got {group_sizes}")
    if not sizes_bytes or min(sizes_bytes) < 4 or repeats < 1:
        raise ValueError(f"need message sizes of at least 4 bytes and repeats >= 1, got {sizes_bytes}, {repeats}")
    group_sizes, sizes = sorted(set(group_sizes)), sorted(set(sizes_bytes))
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    rendezvous = LocalRendezvous()
    procs = [ctx.Process(target=_child, daemon=True, name=f"dist-infer-comm-profile-{rank}",
                         args=(rank, group_sizes, sizes, device, repeats, threads_per_rank, rendezvous.init_method,
                               timeout_s, os.getpid(), events))
             for rank in range(group_sizes[-1])]
    try:
        for p in procs:
            p.start()
        runs = _collect(procs, events, timeout_s)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        rendezvous.close()
    ops: dict = {}
    for (op, n, nbytes), per_rank in sorted(runs.items()):
        slowest = [max(run) for run in zip(*per_rank)]
        table = ops.setdefault(op, {}).setdefault(str(n), {"bytes": [], "seconds": []})
        table["bytes"].append(nbytes)
        table["seconds"].append(statistics.median(slowest))
    backend = "nccl" if device == "cuda" else "gloo"
    return {"backend": backend, "device": device, "threads_per_rank": threads_per_rank, "ops": ops}


def load_or_profile(path: str, group_sizes: list[int], sizes_bytes: list[int] | None = None,
                    **profile_kwargs) -> CommModel:
    """The model of the profile saved at ``path``; measured (with ``default_sizes()`` unless given) and saved
    there first when the file does not exist."""
    if not os.path.exists(path):
        data = profile_collectives(group_sizes, sizes_bytes or default_sizes(), **profile_kwargs)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    with open(path) as f:
        return CommModel.from_profile(json.load(f))


# --------------------------------------------------------------------------------------------- modelling


def _interpolate(xs: list[int], ts: list[float], nbytes: float) -> float:
    """Piecewise linear in bytes; below the smallest point its time; beyond the largest, on at the bandwidth
    of the last two points (their average bandwidth instead where noise made the last step negative)."""
    if nbytes <= xs[0]:
        return ts[0]
    if nbytes >= xs[-1]:
        slope = (ts[-1] - ts[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        return ts[-1] + (slope if slope > 0 else ts[-1] / xs[-1]) * (nbytes - xs[-1])
    i = bisect.bisect_right(xs, nbytes)
    return ts[i - 1] + (ts[i] - ts[i - 1]) * (nbytes - xs[i - 1]) / (xs[i] - xs[i - 1])


def _fit(xs: list[int], ts: list[float]) -> tuple[float, float]:
    """(alpha, beta) of t = alpha + beta * bytes, neither negative: beta the seconds per byte between the largest
    two messages (where bandwidth rules, as in ``_interpolate``'s extrapolation), alpha what is left of the
    smallest message's time (where latency rules). A least-squares line would let the largest messages decide
    alone (unweighted) or miss them (weighted by 1/t^2) on gloo, whose bandwidth varies with message size."""
    beta = (ts[-1] - ts[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
    if beta <= 0:
        beta = ts[-1] / xs[-1]
    return max(0.0, ts[0] - beta * xs[0]), beta


class CommModel:
    """Seconds for one collective of ``nbytes`` (the input tensor's bytes on one rank) over ``group_size`` ranks.

    Measured (``from_profile``): interpolated in that group size's table; a group size never measured takes
    alpha (latency) and beta (seconds per byte) fitted on the nearest measured size (``_fit``), scaled by the
    ratio of ``ring_factors``. Datasheet (``from_links``): the ring formulas themselves."""

    def __init__(self, tables: dict | None = None, links: tuple[float, float] | None = None, meta: dict | None = None):
        self.tables = tables or {}  # op -> group size -> (bytes, seconds), bytes ascending
        self.links = links  # (bandwidth bytes/s, latency s)
        self.meta = meta or {}

    @classmethod
    def from_profile(cls, data: dict) -> CommModel:
        """From ``profile_collectives``' dict (or ``to_dict``'s of either kind)."""
        if "bandwidth_bytes_per_s" in data:
            return cls.from_links(data["bandwidth_bytes_per_s"], data["latency_s"])
        tables = {}
        for op, by_size in data["ops"].items():
            ring_factors(op, 2)  # an unknown op is an error here, not at the first time() call
            tables[op] = {int(n): tuple(zip(*sorted(zip(t["bytes"], t["seconds"])))) for n, t in by_size.items()}
        return cls(tables=tables, meta={k: v for k, v in data.items() if k != "ops"})

    @classmethod
    def from_links(cls, bandwidth_bytes_per_s: float, latency_s: float) -> CommModel:
        """Datasheet model (no measurements), ring algorithms over n ranks of links of bandwidth bw, latency lat:

            all_reduce:  2 (n-1)/n * B / bw + 2 (n-1) * lat      B: the tensor's bytes on one rank
            all_gather:    (n-1)/n * B_out / bw + (n-1) * lat     B_out: the gathered tensor's bytes (n * B)
            send_recv:     B / bw + lat
        """
        if bandwidth_bytes_per_s <= 0 or latency_s < 0:
            raise ValueError(f"need bandwidth > 0 and latency >= 0, got {bandwidth_bytes_per_s}, {latency_s}")
        return cls(links=(float(bandwidth_bytes_per_s), float(latency_s)))

    def time(self, op: str, nbytes: int, group_size: int) -> float:
        """Seconds; 0 for a group of one rank. ValueError for an op not in ``OPS`` or not in the profile."""
        lat_n, bw_n = ring_factors(op, group_size)
        if group_size <= 1:
            return 0.0
        wire = nbytes * group_size if op == "all_gather" else nbytes  # the byte variable of the formulas/tables
        if self.links is not None:
            bandwidth, latency = self.links
            return lat_n * latency + bw_n * wire / bandwidth
        table = self.tables.get(op)
        if not table:
            raise ValueError(f"the profile has no {op} measurements (it has: {', '.join(self.tables) or 'none'})")
        if op == "send_recv" or group_size in table:
            xs, ts = table.get(group_size) or table[min(table, key=lambda m: abs(m - _PAIR))]
            return _interpolate(list(xs), list(ts), wire)
        nearest = min(table, key=lambda m: (abs(m - group_size), -m))
        alpha, beta = _fit(list(table[nearest][0]), list(table[nearest][1]))
        lat_m, bw_m = ring_factors(op, nearest)
        return alpha * lat_n / lat_m + beta * bw_n / bw_m * wire

    def to_dict(self) -> dict:
        if self.links is not None:
            return {"bandwidth_bytes_per_s": self.links[0], "latency_s": self.links[1]}
        ops = {op: {str(n): {"bytes": list(xs), "seconds": list(ts)} for n, (xs, ts) in sorted(table.items())}
               for op, table in self.tables.items()}
        return {**self.meta, "ops": ops}
