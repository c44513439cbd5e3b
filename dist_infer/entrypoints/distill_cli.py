"""``dist-infer distill``: its flags (the teacher's engine flags are the usual ones) and its run.

    dist-infer distill OUT --student PRUNED/ [--tp 2 ...]        the teacher is --model (default: embedded)
    dist-infer distill OUT --drop-layers 0.25                    the student: the teacher less a quarter of its blocks
    torchrun --nproc-per-node 2 --no-python dist-infer distill OUT ...   the student trains data-parallel (DDP)
"""

from __future__ import annotations

import argparse
import dataclasses

from dist_infer.distill.config import BUILTIN_DATA, LOSSES, PRECISIONS, DistillConfig


def add_distill_parser(sub) -> None:
    from dist_infer.engine.arg_utils import EngineArgs

    d = sub.add_parser("distill", help="train a student checkpoint on the teacher's top-k logprobs",
                       description="Knowledge distillation. The teacher (--model, default the embedded model) runs "
                                   "on dist-infer's engine under any layout (--tp/--pp/--dp/--executor); its top-k "
                                   "logprobs are cached on disk. Rerunning the command resumes from the last "
                                   "checkpoint in OUT.")
    d.add_argument("output_dir", metavar="OUT", help="checkpoints, then the final Hugging Face folder")
    who = d.add_mutually_exclusive_group(required=True)
    who.add_argument("--student", help="the student's Hugging Face folder (e.g. from dist-infer prune)")
    who.add_argument("--drop-layers", type=float, help="student = the teacher without this many blocks "
                                                       "(an integer) or this fraction of them (below 1)")
    d.add_argument("--teacher", dest="model", default=argparse.SUPPRESS, help="the teacher (same as --model)")
    defaults = DistillConfig.__dataclass_fields__

    def opt(flag, name, **kw):
        field = defaults[name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        d.add_argument(flag, dest=name, default=default, **kw)

    opt("--data", "data", nargs="+", help=f"{' and/or '.join(BUILTIN_DATA)} and/or .txt/.jsonl files "
                                          f"(default: stdlib)")
    opt("--text-field", "text_field", help="the JSONL field holding the text (default: text)")
    opt("--max-texts", "max_texts", type=int, help="use only the first N texts")
    opt("--seq-len", "seq_len", type=int, help="tokens per training window (default 512)")
    opt("--heldout-fraction", "heldout_fraction", type=float, help="windows kept for evaluation (default 0.05)")
    opt("--top-k", "top_k", type=int, help="teacher logprobs kept per position (default 20)")
    opt("--loss", "loss", choices=LOSSES, help="default forward_kl")
    opt("--kl-mix", "kl_mix", type=float, help="mixed: weight of forward KL (default 0.5)")
    opt("--ce-weight", "ce_weight", type=float, help="add this times the cross-entropy on the text (default 0)")
    opt("--lr", "lr", type=float, help="peak learning rate (default 1e-4)")
    opt("--weight-decay", "weight_decay", type=float, help="AdamW weight decay (default 0)")
    opt("--warmup-ratio", "warmup_ratio", type=float, help="fraction of steps warming up (default 0.05)")
    opt("--batch-size", "batch_size", type=int, help="windows per micro-step per process (default 4)")
    opt("--grad-accumulation", "grad_accumulation", type=int, help="micro-steps per step (default 4)")
    opt("--epochs", "epochs", type=float, help="passes over the training windows (default 1)")
    opt("--max-steps", "max_steps", type=int, help="steps to train (overrides --epochs)")
    opt("--precision", "precision", choices=PRECISIONS, help="auto: bf16 autocast where supported")
    opt("--freeze-embeddings", "freeze_embeddings", action=argparse.BooleanOptionalAction,
        help="keep the embedding and LM head fixed (default: train them)")
    opt("--eval-every", "eval_every", type=int, help="steps between held-out evaluations (default 50)")
    opt("--save-every", "save_every", type=int, help="steps between checkpoints (default 50)")
    opt("--keep-checkpoints", "keep_checkpoints", type=int, help="default 2")
    opt("--cache-dir", "cache_dir", help="teacher targets (default: the dist-infer cache folder)")
    EngineArgs.add_cli_args(d)  # its --seed also seeds the data split and order
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_distill(args) -> int:
    import os

    from dist_infer.cluster_config import engine_args_from_cli
    from dist_infer.distill import distill

    values = {name: getattr(args, name) for name in DistillConfig.__dataclass_fields__ if hasattr(args, name)}
    config = DistillConfig(**values)  # validated before the teacher loads
    summary = distill(engine_args_from_cli(args), config)
    if int(os.environ.get("RANK", 0)) == 0:
        first, last = summary["initial"], summary["final"]
        print(f"distilled {summary['steps']} steps ({summary['tokens']} tokens, {summary['train_seconds']:.0f} s): "
              f"held-out KL {first['heldout_kl']:.4f} -> {last['heldout_kl']:.4f}, perplexity "
              f"{first['heldout_ppl']:.2f} -> {last['heldout_ppl']:.2f}; student written to {config.output_dir}")
    return 0
