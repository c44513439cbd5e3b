"""``dist-infer profile`` and ``dist-infer plan``: their flags and their runs.

    dist-infer profile [--model M] [--tp 1,3] [--quick]            costs measured on this machine, saved as JSON
    dist-infer plan [--model M] [--cluster cluster.yaml] [--workload poisson:2:200:128:64]
                    [--slo ttft_p99=500ms,tpot_p99=50ms] [--write-config best.yaml] [--json plan.json]
"""

from __future__ import annotations

import argparse
import json


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def add_plan_parsers(sub) -> None:
    from dist_infer.engine.arg_utils import EngineArgs

    prof = sub.add_parser("profile", help="measure what a step of a model costs on this machine (for `plan`)",
                          description="Times a tensor-parallel rank's slice of the model (layers, attention, "
                                      "logits and sampling, per-step overhead) at each tp size and thread count, the "
                                      "engine's own per-step work, and collectives by size and group size; writes "
                                      "one JSON file per device kind and model shape.")
    prof.add_argument("--model", "-m", default=None, help="Hugging Face folder or .gguf file (default: embedded)")
    prof.add_argument("--tp", dest="tp_sizes", type=_sizes, help="tensor-parallel sizes to profile (default: every "
                                                                   "valid size up to the core count + 1)")
    prof.add_argument("--threads", dest="thread_counts", type=_sizes, help="threads per worker to profile (default: "
                                                                          "those the mp executor hands out here)")
    prof.add_argument("--dtype", default="auto")
    prof.add_argument("--quantization", choices=["int8", "int4"], default=None)
    prof.add_argument("--output", "-o", help="where to write the JSON (default: the cache, where `plan` looks)")
    prof.add_argument("--quick", action="store_true", help="a coarser grid (about a third of the time)")
    prof.add_argument("--no-comm", dest="comm", action="store_false", help="skip the collectives")
    prof.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    plan = sub.add_parser("plan", help="rank tp x pp x dp layouts for a model and a cluster by simulated serving",
                          description="Enumerates the layouts the model and cluster allow, simulates the workload on "
                                      "each with the engine's own scheduler and a cost model (this machine's profile, "
                                      "or the cluster GPU's datasheet roofline), and prints them ranked.")
    EngineArgs.add_cli_args(plan)
    plan.add_argument("--cluster", dest="config_file", default=argparse.SUPPRESS, metavar="CLUSTER.yaml",
                      help="cluster config: its cluster section (nodes, gpus_per_node, gpu, links) and engine "
                           "settings (default: this machine)")
    plan.add_argument("--workload", default="batch:32:128:128",
                      help="batch:N:PROMPT:OUTPUT, poisson:RATE:N:PROMPT:OUTPUT (lengths N or LOW-HIGH) or "
                           "trace:FILE.jsonl (default: batch:32:128:128)")
    plan.add_argument("--slo", help="e.g. ttft_p99=500ms,tpot_p99=50ms")
    plan.add_argument("--profile", dest="profile_file", help="a profile JSON (default: this machine's, on a CPU "
                                                              "cluster)")
    plan.add_argument("--tp-sizes", type=_sizes, help="only these tensor-parallel sizes")
    plan.add_argument("--pp-sizes", type=_sizes, help="only these pipeline-parallel sizes")
    plan.add_argument("--dp-sizes", type=_sizes, help="only these data-parallel sizes")
    plan.add_argument("--max-workers", type=int, default=12, help="CPU-only clusters: most worker processes")
    plan.add_argument("--write-config", help="write the best layout as a cluster config YAML")
    plan.add_argument("--json", dest="json_out", help="write every ranked layout's figures as JSON")
    plan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_profile(args) -> int:
    from dist_infer.planner.api import profile

    path = profile(None if args.model in (None, "default") else args.model, args.tp_sizes, args.thread_counts,
                   args.output, args.quick, dtype=args.dtype, quantization=args.quantization, comm=args.comm)
    print(f"profile written to {path}")
    return 0


def run_plan(args) -> int:
    import dataclasses

    from dist_infer.engine.arg_utils import EngineArgs
    from dist_infer.planner.api import load_cluster, plan_model, write_config

    cluster = getattr(args, "config_file", None)
    # Engine flags given on the command line (absent ones are absent from args); the cluster file's come first.
    given = {f.name: vars(args)[f.name] for f in dataclasses.fields(EngineArgs)
             if f.name in vars(args) and f.name != "config_file"}
    result = plan_model(given.pop("model", None), cluster, args.workload, args.slo, args.profile_file,
                        args.tp_sizes, args.pp_sizes, args.dp_sizes, args.max_workers, **given)
    print(f"{result.workload.describe()}; costs: {result.cost_source}")
    print(result.table())
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"workload": result.workload.describe(), "cost_source": result.cost_source,
                       "slo": str(result.slo) if result.slo else None, "layouts": result.rows(),
                       "refused": {str(c.layout): c.refused for c in result.refused}}, f, indent=1)
    if args.write_config:
        path = write_config(result, args.write_config, load_cluster(cluster)[1])
        print(f"best layout ({result.best.layout}) written to {path}")
    return 0
