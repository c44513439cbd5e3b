"""Training text as token windows: named corpora or the user's files, packed into ``[N, seq_len]`` windows by the
teacher's tokenizer, and a held-out split that training never sees."""

from __future__ import annotations

import functools
import hashlib

import torch


def load_texts(sources: list[str], text_field: str = "text", max_texts: int | None = None) -> list[str]:
    """``"calibration"``, ``"stdlib"`` (see ``dist_infer.eval.corpus``), a ``.txt`` file (its whole text) or a
    ``.jsonl`` file (each line's ``text_field``), in the order given."""
    from dist_infer.eval import corpus

    texts: list[str] = []
    for source in sources:
        if source == "calibration":
            texts += corpus.calibration_texts()
        elif source == "stdlib":
            texts += corpus.training_texts()
        elif source.endswith(".jsonl"):
            texts += _jsonl_texts(source, text_field)
        else:
            with open(source, encoding="utf-8") as f:
                texts.append(f.read())
    texts = [t for t in texts if t.strip()]
    if max_texts is not None:
        texts = texts[:max_texts]
    if not texts:
        raise ValueError(f"no text in {', '.join(sources)}")
    return texts


def _jsonl_texts(path: str, text_field: str) -> list[str]:
    from dist_infer.jsonl import read_jsonl

    texts = []
    for number, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path}:{number}: expected an object with a string {text_field!r} field")
        texts.append(record[text_field])
    return texts


def token_windows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """``[N, seq_len]`` int64: the texts joined by blank lines (as the evaluation corpus is), tokenized without
    special tokens, cut into consecutive windows; the tail shorter than a window is dropped."""
    ids = tokenizer.encode("\n\n".join(texts), add_special_tokens=False)
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(f"the training text has {len(ids)} tokens: fewer than the 2 windows of seq_len={seq_len} "
                         f"needed (one to train on, one held out); give more text or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def split_heldout(num_windows: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, heldout)``: ``max(1, round(fraction * N))`` windows chosen at random with ``seed`` are
    held out (at least one window stays for training)."""
    held = min(max(1, round(fraction * num_windows)), num_windows - 1)
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


@functools.lru_cache(maxsize=4)  # every micro-step of an epoch asks for the same order
def epoch_order(num_windows: int, epoch: int, seed: int) -> torch.Tensor:
    """The training windows' order in ``epoch``: a function of (seed, epoch) only, so a resumed run sees the same
    batches as an unbroken one."""
    return torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def windows_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int32).numpy().tobytes()).hexdigest()[:16]
