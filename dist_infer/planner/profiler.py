"""``dist-infer profile``: measures on this machine what one engine step of a model costs, part by part.

What a tensor-parallel rank computes is a single-device model with 1/tp of the heads, K/V heads, MLP channels
and vocabulary, so each candidate tp size is profiled on such a *slice* (random weights, ``PROFILE_LAYERS``
layers, the model's own head_dim and hidden size), run by the real worker code in this process on made-up steps:

* per layer, split by forward hooks into attention over the paged cache and the rest ("dense": projections,
  norms, RoPE, MLP); dense is a table over the step's tokens T, attention a non-negative linear fit over
  decodes (their count and the keys they read) and prompt chunks (their count, query-key pairs, keys gathered);
* the head (final logits of the slice's vocabulary, and sampling) by sampled rows; the rest of a worker's step
  (inputs, embedding, bookkeeping) as a fit over requests and tokens;
* per thread count a layout gives its workers (the mp executor gives each ``cores // workers`` threads), and the
  one-thread slice again in as many processes at once as there are cores: what a core delivers when all are busy;
* the engine's own side of a step (scheduling, handing the step to the worker processes, applying the result,
  detokenizing) from a real engine on the slice with one and two worker processes;
* collectives and point-to-point transfers by size and group size (``comm_profile``), and what a collective costs
  inside real steps of the first layers run at each tp size (``comm_in_steps``).

Everything lands in one JSON file per device kind and model shape (``profile_path``), which the planner reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dist_infer.kv_cache_groups import cdiv
from dist_infer.planner.fits import linear_fit, table
from dist_infer.planner.step_shape import Layout, attention_features

PROFILE_VERSION = 1
PROFILE_LAYERS = 4
ATTENTION_TERMS = ["decode_call", "decodes", "decode_keys", "prefill_call", "prefills", "prefill_pairs",
                   "prefill_keys"]
OVERHEAD_TERMS = ["step", "seqs", "tokens"]
_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings")


def device_kind(device: torch.device) -> str:
    """A name for the kind of device a profile holds: the GPU's name, or the CPU's model and usable cores."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() + f" {len(os.sched_getaffinity(0))} cores"
    return "".join(c if c.isalnum() else "-" for c in f"{device.type}-{name}").strip("-").lower()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def model_shape_key(hf_config, dtype: str, quantization: str | None) -> str:
    """What the per-layer costs depend on: the model's shapes, dtype and quantization (not its weights)."""
    shape = {k: getattr(hf_config, k, None) for k in _SHAPE_KEYS}
    shape["head_dim"] = shape["head_dim"] or hf_config.hidden_size // hf_config.num_attention_heads
    blob = json.dumps([shape, dtype, quantization], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def profile_path(kind: str, shape_key: str) -> Path:
    from dist_infer.model_loader.cache_dir import cache_root

    return Path(cache_root()) / "profiles" / kind / f"{shape_key}.json"


# ---- the slice a tensor-parallel rank computes ---------------------------------------------------------------
def slice_config(hf_config, tp: int, num_layers: int = PROFILE_LAYERS):
    """The config of a single-device model with one tp rank's shapes."""
    config = type(hf_config).from_dict(hf_config.to_dict())
    heads, kv = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None) or \
        hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    config.num_attention_heads = heads // tp
    config.num_key_value_heads = kv // tp if kv % tp == 0 else 1  # tp beyond the K/V heads replicates them
    config.head_dim = head_dim
    config.intermediate_size = hf_config.intermediate_size // tp
    config.vocab_size = cdiv(hf_config.vocab_size, tp)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:num_layers])
    return config


def make_slice_model(hf_config, tp: int, dest: str, dtype: torch.dtype) -> str:
    """Writes a random-weight slice model to ``dest`` (config and safetensors)."""
    from transformers import AutoModelForCausalLM

    config = slice_config(hf_config, tp)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(dest)
    return dest


# ---- one worker's step, part by part -------------------------------------------------------------------------
def step_grid(max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int, quick: bool = False) -> list[list]:
    """Steps to time, as lists of (query_len, context_len): decode batches by size and context, prompt chunks by
    length with and without earlier context, several chunks in one step, and decodes mixed with a chunk."""
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_num_seqs]
    contexts = [c for c in (32, 256, 1024, 4096) if c < max_model_len]
    chunks = [n for n in (8, 32, 128, 512, 1024, 2048) if n <= min(max_num_batched_tokens, max_model_len - 256)]
    if quick:
        batches, contexts, chunks = batches[::2], contexts[:2], chunks[::2]
    steps = [[(1, c)] * b for b in batches for c in contexts if b * c <= 1 << 17]
    steps += [[(n, c)] for n in chunks for c in (0, min(1024, max_model_len // 2)) if n + c <= max_model_len]
    steps += [[(n, c)] * k for k in (4, 16) for n in (16, 64) for c in (0, 128)
              if k * n <= max_num_batched_tokens and k <= max_num_seqs and n + c <= max_model_len]
    steps += [[(1, 256)] * b + [(n, 0)] for b in batches[1::2] for n in chunks[::2]
              if b + n <= max_num_batched_tokens]
    return steps


class _Timers:
    """Forward hooks timing each decoder layer and each attention module apart (synchronizing on CUDA), and the
    head. A stage's first layer runs slower than the rest (its inputs come cold from the embedding or the
    previous stage), so the per-layer costs are taken from the layers after it (``steady``) and the first
    layer's excess stays with the step's fixed part."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from dist_infer.layers.attention import Attention

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        layers = [m for name, m in model.named_modules() if name.count(".") == 2 and ".layers." in f".{name}"
                  and type(m).__name__ != "MissingLayer"]
        self.num_layers = len(layers)
        self.seconds: dict[str, float] = {}
        for i, module in enumerate(layers):
            self._hook(module, f"layer{i}")
            for inner in module.modules():
                if isinstance(inner, Attention):
                    self._hook(inner, f"attention{i}")
        compute_logits = model.compute_logits

        def timed_logits(hidden):
            self.sync()
            start = time.perf_counter()
            out = compute_logits(hidden)
            self.sync()
            self.seconds["head"] = self.seconds.get("head", 0.0) + time.perf_counter() - start
            return out

        model.compute_logits = timed_logits

    def _hook(self, module, key: str) -> None:
        starts = []

        def before(*_):
            self.sync()
            starts.append(time.perf_counter())

        def after(*_):
            self.sync()
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def reset(self) -> dict:
        """Seconds since the last reset: ``layer`` and ``attention`` per steady layer (mean over layers 1..), and
        the head."""
        taken, self.seconds = self.seconds, {}
        steady = range(1, self.num_layers)
        return {"layer": sum(taken[f"layer{i}"] for i in steady) / len(steady),
                "attention": sum(taken[f"attention{i}"] for i in steady) / len(steady), "head": taken.get("head", 0.0)}


def measure_worker(folder: str, threads: int, dtype: str, quantization: str | None, steps: list[list],
                   repeats: int = 7, block_size: int = 16, device: str = "cpu", log=print) -> list[dict]:
    """Runs each step of ``steps`` on a worker of the slice model in this process; per step the median seconds of
    the whole step, of its layers, their attention and the head (logits and sampling)."""
    from dist_infer.engine.arg_utils import EngineArgs
    from dist_infer.engine.messages import NewRequestData, SchedulerOutput
    from dist_infer.sampling_params import SamplingParams
    from dist_infer.worker.worker import Worker

    max_len = max(q + c for step in steps for q, c in step)
    max_resident = max(sum(cdiv(q + c, block_size) for q, c in step) for step in steps)
    config = EngineArgs(model=folder, dtype=dtype, quantization=quantization, max_model_len=max_len,
                        block_size=block_size, num_gpu_blocks_override=max_resident + 1, skip_tokenizer_init=True,
                        max_num_batched_tokens=max(sum(q for q, _ in s) for s in steps),
                        max_num_seqs=max(len(s) for s in steps)).create_engine_config()
    saved_threads = torch.get_num_threads()
    worker = Worker(config, num_threads=threads, device=torch.device(device))
    try:
        worker.initialize_cache(worker.determine_num_blocks())
        timers = _Timers(worker.runner.model, worker.device)
        params = SamplingParams(max_tokens=1 << 20, ignore_eos=True, temperature=0.0)
        finished: set[str] = set()
        counter = 0
        runs: list[list[dict]] = [[] for _ in steps]
        # Rounds over the whole grid, not repeats of one step in a row: this machine's speed drifts over seconds,
        # and a drift must not tilt the fitted curves (the first round warms the shapes up and is dropped).
        for round_ in range(repeats + 1):
            for i, step in enumerate(steps):
                new, next_block = [], 1
                for q, c in step:
                    counter += 1
                    nb = cdiv(q + c, block_size)
                    new.append(NewRequestData(str(counter), [1] * (q + c), params,
                                              [list(range(next_block, next_block + nb))], c, q + c, ()))
                    next_block += nb
                out = SchedulerOutput(new_requests=new, finished_req_ids=finished,
                                      num_scheduled_tokens={r.req_id: q for r, (q, _) in zip(new, step)})
                finished = {r.req_id for r in new}
                timers.seconds = {}
                start = time.perf_counter()
                worker.execute_model(out)
                total = time.perf_counter() - start
                if round_:
                    runs[i].append(dict(timers.reset(), total=total))
        samples = [dict({key: statistics.median(r[key] for r in step_runs) for key in step_runs[0]},
                        queries=[list(x) for x in step]) for step, step_runs in zip(steps, runs)]
        log(f"  {len(steps)} steps timed ({threads} thread(s))")
        return samples
    finally:
        del worker
        torch.set_num_threads(saved_threads)


def fit_worker(samples: list[dict]) -> dict:
    """Per-layer dense table over tokens, per-layer attention fit, head table over sampled rows, and the fixed
    part of a step (everything but ``layers x steady layer`` and the head) fitted over requests and tokens."""
    tokens = [sum(q for q, _ in s["queries"]) for s in samples]
    dense = [s["layer"] - s["attention"] for s in samples]
    feats = [attention_features(s["queries"]) for s in samples]
    attention = linear_fit(feats, [s["attention"] for s in samples], ATTENTION_TERMS)
    sampled = [len(s["queries"]) for s in samples]  # every made-up row is at its sequence's end: all sampled
    rest = [s["total"] - PROFILE_LAYERS * s["layer"] - s["head"] for s in samples]
    overhead = linear_fit([{"step": 1.0, "seqs": len(s["queries"]), "tokens": t} for s, t in zip(samples, tokens)],
                          [max(r, 1e-6) for r in rest], OVERHEAD_TERMS)
    return {"dense": table(tokens, dense), "attention": attention, "head": table(sampled, [s["head"] for s in samples]),
            "overhead": overhead}


def _measure_quietly(args: tuple) -> list[dict]:
    return measure_worker(*args, repeats=5, log=lambda message: None)


def measure_busy(folder: str, processes: int, dtype: str, quantization: str | None, steps: list[list]) -> list[dict]:
    """The steps timed in ``processes`` one-thread workers running at once (every core busy): per step the mean of
    their medians. Against the same worker alone this gives what a core delivers when all are busy -- less than
    alone where they share memory bandwidth or caches (``events.SharedHost``)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        per_process = pool.map(_measure_quietly, [(folder, 1, dtype, quantization, steps)] * processes)
    return [{key: statistics.mean(p[i][key] for p in per_process) for key in ("layer", "attention", "total")}
            | {"queries": per_process[0][i]["queries"]} for i in range(len(steps))]


def profile_model(model_folder: str, tp_sizes: list[int], thread_counts: list[int], dtype: str = "auto",
                  quantization: str | None = None, max_num_seqs: int = 128, max_model_len: int = 4096,
                  max_num_batched_tokens: int = 2048, quick: bool = False, device: str = "cpu",
                  comm: bool = True, log=print) -> dict:
    """Measures everything the cost model needs for ``model_folder`` at each tp size and thread count."""
    from dist_infer.config import ModelConfig

    model_config = ModelConfig(model_folder, dtype=dtype, max_model_len=None, skip_tokenizer_init=True)
    hf_config, torch_dtype = model_config.hf_config, model_config.torch_dtype
    dtype_name = str(torch_dtype).removeprefix("torch.")
    max_model_len = min(max_model_len, model_config.max_model_len)
    steps = step_grid(max_num_seqs, max_model_len, max_num_batched_tokens, quick)
    dev = torch.device(device)
    result = {"version": PROFILE_VERSION, "device_kind": device_kind(dev), "device": device,
              "torch": torch.__version__, "model_shape": model_shape_key(hf_config, dtype_name, quantization),
              "dtype": dtype_name, "quantization": quantization, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "workers": {}, "engine": None, "comm": None}
    with tempfile.TemporaryDirectory(prefix="dist-infer-profile-") as tmp:
        for tp in tp_sizes:
            folder = make_slice_model(hf_config, tp, os.path.join(tmp, f"tp{tp}"), torch_dtype)
            for threads in thread_counts:
                log(f"profiling the tp={tp} slice with {threads} thread(s)")
                samples = measure_worker(folder, threads, dtype_name, quantization, steps, device=device, log=log)
                result["workers"][f"tp{tp}-t{threads}"] = dict(fit_worker(samples), samples=samples)
            cores = len(os.sched_getaffinity(0))
            if device == "cpu" and cores > 1 and 1 in thread_counts:
                log(f"profiling the tp={tp} slice in {cores} one-thread processes at once")
                busy = measure_busy(folder, cores, dtype_name, quantization, steps)
                result["workers"][f"tp{tp}-t1"]["busy_dense"] = table(
                    [sum(q for q, _ in s["queries"]) for s in busy], [s["layer"] - s["attention"] for s in busy])
        # The engine's side does not depend on the slice; the full vocabulary's slice detokenizes every id.
        folder = os.path.join(tmp, "tp1")
        if 1 not in tp_sizes:
            make_slice_model(hf_config, 1, folder, torch_dtype)
        _copy_tokenizer(model_folder, folder)
        log("profiling the engine's side of a step")
        from dist_infer.planner.engine_profile import measure_engine

        result["engine"] = measure_engine(folder, dtype_name, log=log)
        if comm:
            from dist_infer.planner.comm_in_steps import measure_in_steps
            from dist_infer.planner.comm_profile import default_sizes, profile_collectives
            from dist_infer.planner.cost_model import ProfiledCost
            from dist_infer.planner.model_shape import ModelShape

            sizes = sorted({t for t in tp_sizes if t > 1} | {2})
            log(f"profiling collectives over {sizes} ranks")
            result["comm"] = profile_collectives(sizes, default_sizes(), device=device)
            cost = ProfiledCost(result, ModelShape.from_hf_config(slice_config(hf_config, 1), torch_dtype.itemsize))
            result["comm_in_steps"] = {}
            for tp in tp_sizes:
                if tp > 1 and f"tp{tp}-t{cost.threads(Layout(tp, 1, 1, (PROFILE_LAYERS,)))}" in result["workers"]:
                    log(f"profiling collectives inside steps at tp={tp}")
                    result["comm_in_steps"][str(tp)] = measure_in_steps(folder, tp, dtype_name, cost, PROFILE_LAYERS,
                                                                        log=log)
    return result


def _copy_tokenizer(source: str, dest: str) -> None:
    """The engine profile detokenizes as a served model does, with the model's own tokenizer."""
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or name == "generation_config.json":
            shutil.copy(os.path.join(source, name), dest)


def save_profile(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def load_profile(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read profile {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"profile {path} is not valid JSON ({e.msg})") from None
    if data.get("version") != PROFILE_VERSION:
        raise ValueError(f"profile {path} has version {data.get('version')!r}; this dist-infer reads version "
                         f"{PROFILE_VERSION}: run `dist-infer profile` again")
    return data
