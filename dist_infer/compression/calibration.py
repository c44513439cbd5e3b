"""Calibration for the compression tools that look at activations (structured pruning, GPTQ): the pinned
calibration text tokenized by the checkpoint's own tokenizer, and quiet transformers loading."""

from __future__ import annotations

import contextlib

import torch

CALIBRATION_MAX_TOKENS = 256


def calibration_batches(src: str, texts: list[str] | None, vocab_size: int, purpose: str) -> list[torch.Tensor]:
    """Token ids ``[1, T <= CALIBRATION_MAX_TOKENS]`` per text, from the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    if texts is None:
        from dist_infer.eval.corpus import calibration_texts

        texts = calibration_texts()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(f"{purpose} measures activations on text and needs the tokenizer of {src}: {e}")
    encoded = (tokenizer(text, truncation=True, max_length=CALIBRATION_MAX_TOKENS)["input_ids"] for text in texts)
    batches = [torch.tensor([ids]) for ids in encoded if ids]
    if not batches:
        raise ValueError(f"{purpose} needs non-empty calibration_texts")
    if max(int(b.max()) for b in batches) >= vocab_size:
        raise ValueError(f"the tokenizer of {src} produces ids beyond the model's vocab_size={vocab_size}")
    return batches


@contextlib.contextmanager
def transformers_progress(show: bool):
    """Silence transformers' own load/save progress bars when ``show`` is false (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    silence = not show and hf_logging.is_progress_bar_enabled()
    if silence:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if silence:
            hf_logging.enable_progress_bar()
