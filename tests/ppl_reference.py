"""Perplexity computed independently of dist-infer: Hugging Face's tokenizer and model, one full forward pass
per window, for comparison with ``dist_infer.eval.perplexity``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_infer.eval.corpus import evaluation_text


@torch.inference_mode()
def hf_perplexity(path: str, max_tokens: int, window: int) -> tuple[float, int]:
    """(exp of the mean NLL, number of predicted tokens) over the first ``max_tokens`` tokens of the evaluation
    text, cut into consecutive windows of ``window`` tokens; in each window every token but the first is
    predicted from the ones before it in that window; a window of one token predicts nothing."""
    ids = AutoTokenizer.from_pretrained(path).encode(evaluation_text(), add_special_tokens=False)[:max_tokens]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        piece = torch.tensor(ids[start:start + window])
        if len(piece) < 2:
            continue
        logits = model(piece.unsqueeze(0)).logits[0, :-1].double()
        nll += F.cross_entropy(logits, piece[1:], reduction="sum").item()
        count += len(piece) - 1
    return math.exp(nll / count), count
