"""What a distillation run does: one validated dataclass (the teacher's engine arguments are separate: any
``EngineArgs`` layout can teach)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

LOSSES = ("forward_kl", "reverse_kl", "mixed")
BUILTIN_DATA = ("calibration", "stdlib")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class DistillConfig:
    """A student learns the teacher's next-token distribution over packed windows of training text.

    Student: ``student`` (a Hugging Face folder with the teacher's tokenizer), or the teacher with
    ``drop_layers`` decoder blocks removed (an int >= 1, or a fraction in (0, 1) of the teacher's blocks).

    Data: ``data`` names ``"calibration"`` (the pinned calibration passages), ``"stdlib"`` (those plus the
    docstrings of every other standard-library module; never the evaluation text) and/or ``.txt`` / ``.jsonl``
    files (a JSONL line's ``text_field``). Texts are joined by blank lines, tokenized by the teacher's tokenizer
    and cut into windows of ``seq_len`` tokens; ``heldout_fraction`` of the windows (at least one), chosen with
    ``seed``, are only ever evaluated on.

    Optimization: AdamW (``lr``, ``weight_decay``), linear warm-up over ``warmup_ratio`` of the steps then cosine
    decay to 0; a step is ``batch_size`` windows per process times ``grad_accumulation`` micro-steps (times the
    number of processes under ``torchrun``). ``max_steps`` (if given) else ``epochs`` passes over the training
    windows. ``precision="auto"``: bf16 autocast where the device has bf16 arithmetic (fp32 master weights).
    """

    output_dir: str
    student: str | None = None
    drop_layers: float = 0
    data: list[str] = field(default_factory=lambda: ["stdlib"])
    text_field: str = "text"
    max_texts: int | None = None
    seq_len: int = 512
    heldout_fraction: float = 0.05
    top_k: int = 20
    loss: str = "forward_kl"
    kl_mix: float = 0.5  # weight of forward KL in "mixed"; reverse KL gets 1 - kl_mix
    ce_weight: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    batch_size: int = 4
    grad_accumulation: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    precision: str = "auto"
    freeze_embeddings: bool = False
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    cache_dir: str | None = None  # teacher targets; default: the dist-infer cache folder
    show_progress: bool = True

    def __post_init__(self):
        self.drop_layers = self.drop_layers or 0  # None (the flag not given) means none
        if not self.output_dir:
            raise ValueError("output_dir must name a folder for checkpoints and the final student")
        if (self.student is None) == (not self.drop_layers):
            raise ValueError("give exactly one of student (a Hugging Face folder) and drop_layers (blocks to "
                             "remove from a copy of the teacher)")
        if self.student is not None and not os.path.isfile(os.path.join(self.student, "config.json")):
            raise ValueError(f"student not found: {self.student} (expected a Hugging Face folder with config.json)")
        if self.drop_layers and not (0 < self.drop_layers < 1 or float(self.drop_layers).is_integer()) \
                or self.drop_layers < 0:
            raise ValueError(f"drop_layers must be a block count >= 1 or a fraction in (0, 1), "
                             f"got {self.drop_layers!r}")
        if not self.data:
            raise ValueError(f"data is empty: give {' or '.join(BUILTIN_DATA)} or .txt/.jsonl files")
        for item in self.data:
            if item not in BUILTIN_DATA and not (os.path.isfile(item) and item.endswith((".txt", ".jsonl"))):
                raise ValueError(f"data {item!r} is neither {' nor '.join(BUILTIN_DATA)} nor an existing .txt or "
                                 f".jsonl file")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _positive_int(self, "seq_len", minimum=2)
        for name in ("top_k", "batch_size", "grad_accumulation", "eval_every", "save_every", "keep_checkpoints"):
            _positive_int(self, name)
        if self.max_steps is not None:
            _positive_int(self, "max_steps")
        if self.max_texts is not None:
            _positive_int(self, "max_texts")
        _in_range(self, "heldout_fraction", 0.0, 1.0, open_high=True, open_low=True)
        _in_range(self, "kl_mix", 0.0, 1.0)
        _in_range(self, "warmup_ratio", 0.0, 1.0)
        if not self.lr > 0 or self.weight_decay < 0 or self.ce_weight < 0 or not self.epochs > 0:
            raise ValueError(f"lr and epochs must be > 0, weight_decay and ce_weight >= 0 (got lr={self.lr}, "
                             f"epochs={self.epochs}, weight_decay={self.weight_decay}, ce_weight={self.ce_weight})")


def _positive_int(config, name: str, minimum: int = 1) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _in_range(config, name: str, low: float, high: float, open_low=False, open_high=False) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and (low < value if open_low else low <= value) and \
        (value < high if open_high else value <= high)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}, "
                         f"got {value!r}")
