"""Resumable training state: the student's weights (a Hugging Face folder, so any checkpoint also loads on its
own), the optimizer and schedule, the step and the random state. A checkpoint is written under a temporary
name and renamed when complete, so a run killed mid-write leaves the previous one intact."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str) -> Path | None:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def save_checkpoint(output_dir: str, model, optimizer, scheduler, step: int, extra: dict, keep: int) -> Path:
    """Writes ``checkpoints/step-NNNNNNNN`` and removes all but the ``keep`` newest."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "extra": extra, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(p for p in root.iterdir() if _NAME.match(p.name))[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_trainer_state(path: Path, optimizer, scheduler) -> tuple[int, dict]:
    """Restores the optimizer, the schedule and the random state; returns ``(step, extra)``."""
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["step"], state["extra"]
