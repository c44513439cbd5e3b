"""``distill``: the training loop. Teacher targets first (rank 0 under torchrun; the others wait for the cache
file), then the student trains data-parallel (DDP) when launched with torchrun, on one process otherwise.

A step takes ``G = batch_size * grad_accumulation * world_size`` windows: sample ``i`` of the endless stream is
window ``order_e[i mod N]`` of epoch ``e = i // N``, with ``order_e`` a seeded permutation of the ``N`` training
windows, so the batches of any step are a function of (seed, step) alone: a resumed run sees exactly the batches
an unbroken one would. Rank ``r``, micro-step ``m`` of step ``s`` takes samples ``s*G + (m*W + r)*B .. + B``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dist_infer.compression.calibration import transformers_progress
from dist_infer.distill import checkpoint, data, student as student_mod, teacher as teacher_mod
from dist_infer.distill.config import DistillConfig
from dist_infer.distill.loss import distill_loss, topk_kl


class Callback:
    """Hooks for callers that watch a run (tests kill it at a chosen point)."""

    def on_step_end(self, step: int, metrics: dict) -> None: ...


def distill(teacher_args, config: DistillConfig, callbacks: list[Callback] = ()) -> dict:
    """Train ``config``'s student on the teacher run by the engine ``teacher_args`` (an ``EngineArgs``); write a
    Hugging Face folder to ``config.output_dir`` and return a summary (also in ``distill_summary.json``)."""
    from transformers import AutoTokenizer

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(config.output_dir)
    teacher_dir = teacher_mod.teacher_folder(teacher_args)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    windows = data.token_windows(tokenizer, data.load_texts(config.data, config.text_field, config.max_texts),
                                 config.seq_len)
    train_idx, held_idx = data.split_heldout(len(windows), config.heldout_fraction, config.seed)
    student_src, dropped = _prepare_student(config, teacher_dir, rank, out)
    if rank == 0:
        targets, cache = teacher_mod.load_or_compute(teacher_args, teacher_dir, windows, config.top_k,
                                                     config.cache_dir, config.show_progress)
    else:
        cache = teacher_mod.cache_path(teacher_args, teacher_dir, windows, config.top_k, config.cache_dir)
        targets = teacher_mod.wait_for(cache)
    device = _init_process_group(world)
    try:
        with transformers_progress(False):  # its load/save bars would cut through the training bar
            return _train(config, tokenizer, windows, targets, train_idx, held_idx, teacher_dir, student_src, dropped,
                          cache, rank, world, device, list(callbacks))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _prepare_student(config: DistillConfig, teacher_dir: str, rank: int, out: Path) -> tuple[str, dict | None]:
    if not config.drop_layers:
        return config.student, None
    path = out / "initial-student"
    summary_file = out / "initial-student.json"
    if rank == 0 and not summary_file.is_file():
        summary = student_mod.make_layer_dropped_student(teacher_dir, str(path), config.drop_layers,
                                                         config.show_progress)
        tmp = summary_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, default=str))
        os.replace(tmp, summary_file)  # written last: its presence means the folder is complete
    while not summary_file.is_file():  # other ranks: rank 0 is building it (torchrun stops us if it fails)
        time.sleep(1.0)
    return str(path), json.loads(summary_file.read_text())


def _init_process_group(world: int) -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _train(config, tokenizer, windows, targets, train_idx, held_idx, teacher_dir, student_src, dropped, cache,
           rank, world, device, callbacks) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    student_mod.check_tokenizers(tokenizer, student_src, _vocab_size(student_src))
    resume = checkpoint.latest_checkpoint(config.output_dir)
    model = student_mod.load_student(str(resume or student_src), device, config.freeze_embeddings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    per_step = config.batch_size * config.grad_accumulation * world
    total = config.max_steps or max(1, math.ceil(config.epochs * len(train_idx) / per_step))
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    step, history = 0, {"log": [], "train_seconds": 0.0}
    if resume is not None:
        step, history = checkpoint.load_trainer_state(resume, optimizer, scheduler)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    bf16 = config.precision == "bfloat16" or (config.precision == "auto" and student_mod.bf16_supported(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    evaluate = lambda: _evaluate(model, windows, targets, held_idx, rank, world, device, autocast)  # noqa: E731
    log = history["log"]
    if step == 0:
        log.append({"step": 0, **evaluate()})
    tokens_per_step = per_step * (windows.shape[1] - 1)
    bar = tqdm(total=total, initial=step, desc="distill", unit="step", disable=not config.show_progress or rank)
    started, done_here = time.perf_counter(), 0
    while step < total:
        metrics = _one_step(ddp, optimizer, scheduler, config, windows, targets, train_idx, step, rank, world,
                            device, autocast)
        step += 1
        done_here += 1
        rate = done_here * tokens_per_step / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{rate:.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if step % config.eval_every == 0 or step == total:
            log.append({"step": step, "train_loss": metrics["loss"], **evaluate()})
            if rank == 0:
                bar.write(f"step {step}: held-out KL {log[-1]['heldout_kl']:.4f}, "
                          f"perplexity {log[-1]['heldout_ppl']:.3f}")
        for callback in callbacks:
            callback.on_step_end(step, metrics)
        if step % config.save_every == 0 or step == total:
            history["train_seconds"] += time.perf_counter() - started
            started, done_here = time.perf_counter(), 0
            _save(config, model, optimizer, scheduler, step, history, rank, world)
    bar.close()
    summary = {"steps": total, "tokens": total * tokens_per_step, "train_seconds": round(history["train_seconds"], 1),
               "windows": {"train": len(train_idx), "heldout": len(held_idx), "seq_len": windows.shape[1]},
               "initial": log[0], "final": log[-1], "teacher_cache": str(cache), "student_source": student_src,
               "dropped_layers": dropped and dropped.get("dropped"), "world_size": world, "bf16": bf16,
               "config": asdict(config)}
    if rank == 0:
        _write_final(config, model, teacher_dir, student_src, summary)
    return summary


def _vocab_size(folder: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).vocab_size


def _batch(windows, targets, train_idx, samples: torch.Tensor, seed: int):
    n = len(train_idx)
    epochs = (samples // n).tolist()
    orders = {e: data.epoch_order(n, e, seed) for e in set(epochs)}
    rows = train_idx[torch.stack([orders[e][i % n] for e, i in zip(epochs, samples.tolist())])]
    return windows[rows], targets.top_ids[rows], targets.top_logprobs[rows]


def _one_step(ddp, optimizer, scheduler, config, windows, targets, train_idx, step, rank, world, device,
              autocast) -> dict:
    per_step, b = config.batch_size * config.grad_accumulation * world, config.batch_size
    total_loss = torch.zeros((), device=device)
    for m in range(config.grad_accumulation):
        first = step * per_step + (m * world + rank) * b
        samples = torch.arange(first, first + b)
        ids, top_ids, top_lp = (t.to(device) for t in _batch(windows, targets, train_idx, samples, config.seed))
        last = m == config.grad_accumulation - 1
        sync = contextlib.nullcontext() if last or not hasattr(ddp, "no_sync") else ddp.no_sync()
        with sync:
            with autocast:
                logits = ddp(input_ids=ids).logits[:, :-1]
            loss, _ = distill_loss(logits, top_ids, top_lp, ids[:, 1:], config.loss, config.kl_mix, config.ce_weight)
            (loss / config.grad_accumulation).backward()
        total_loss += loss.detach() / config.grad_accumulation
    torch.nn.utils.clip_grad_norm_([p for p in ddp.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        torch.distributed.all_reduce(total_loss)
        total_loss /= world
    return {"loss": total_loss.item()}


@torch.no_grad()
def _evaluate(model, windows, targets, held_idx, rank, world, device, autocast) -> dict:
    """Mean forward KL to the teacher and perplexity of the text, over this rank's share of the held-out
    windows, summed over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # kl sum, nll sum, positions
    for row in held_idx[rank::world].tolist():
        ids = windows[row:row + 1].to(device)
        with autocast:
            logits = model(input_ids=ids).logits[:, :-1].float()
        kl = topk_kl(logits, targets.top_ids[row:row + 1].to(device), targets.top_logprobs[row:row + 1].to(device))
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[0, 1:], reduction="sum")
        sums += torch.tensor([kl.sum().item(), nll.item(), kl.numel()], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    kl_sum, nll_sum, count = sums.tolist()
    return {"heldout_kl": kl_sum / count, "heldout_ppl": math.exp(nll_sum / count)}


def _save(config, model, optimizer, scheduler, step, history, rank, world) -> None:
    if rank == 0:
        checkpoint.save_checkpoint(config.output_dir, model, optimizer, scheduler, step, history,
                                   config.keep_checkpoints)
    if world > 1:
        torch.distributed.barrier()


def _write_final(config, model, teacher_dir: str, student_src: str, summary: dict) -> None:
    """The output folder itself becomes the student: weights, config and the tokenizer files (the teacher's,
    which the student was checked to share, then any of the student's own)."""
    from dist_infer.compression.side_files import copy_side_files

    out = Path(config.output_dir)
    model.save_pretrained(str(out))
    copy_side_files(teacher_dir, str(out))
    copy_side_files(student_src, str(out))
    with open(out / "distill_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
