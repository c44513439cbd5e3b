"""Perplexity of a model (as dist-infer runs it: dtype, quantization, KV-cache dtype) on the fixed corpus.

``ppl = exp(mean over predicted tokens of -log p(token | preceding tokens))``. The corpus tokens are cut into
windows of ``window`` tokens; each window is fed through the model in chunks of ``chunk`` tokens, so every
chunk after the first attends to keys and values read back from the paged KV cache -- which is what
``kv_cache_dtype="int8"`` changes. Every token of a window but the first is predicted once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.eval.corpus import corpus_fingerprint, evaluation_text
from dist_infer.layers.forward_context import AttentionMetadata, PrefillSpan, set_forward_context


def corpus_tokens(tokenizer, max_tokens: int) -> list[int]:
    return tokenizer.encode(evaluation_text(), add_special_tokens=False)[:max_tokens]


@torch.inference_mode()
def perplexity(max_tokens: int = 4096, window: int = 512, chunk: int = 128, show_progress: bool = True,
               **engine_kwargs) -> dict:
    """``engine_kwargs``: model, dtype, quantization, kv_cache_dtype, ... as for ``LLM``."""
    from dist_infer.engine.tokenizer import load_tokenizer
    from dist_infer.worker.worker import Worker

    config = EngineArgs.from_kwargs(**{"max_num_seqs": 1, **engine_kwargs}).create_engine_config()
    tokens = corpus_tokens(load_tokenizer(config.model_config), max_tokens)
    window = min(window, config.model_config.max_model_len)
    worker = Worker(config)
    runner, block_size = worker.runner, config.cache_config.block_size
    num_blocks = -(-window // block_size)
    runner.allocate_kv_cache(num_blocks)
    table = torch.arange(num_blocks, device=worker.device)
    total_nll, predicted = 0.0, 0
    windows = [tokens[i:i + window] for i in range(0, len(tokens), window) if len(tokens[i:i + window]) > 1]
    for ids in tqdm(windows, desc="Perplexity windows", disable=not show_progress):
        runner.kv_store.prepare_blocks(table.tolist(), 0)
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            positions = torch.arange(start, end, device=worker.device)
            meta = AttentionMetadata(positions.clone(), None, [PrefillSpan(0, end - start, start, table)])
            with set_forward_context(meta):
                hidden = runner.model(torch.tensor(ids[start:end], device=worker.device), positions)
            targets = torch.tensor(ids[start + 1:end + 1], device=worker.device)
            logits = runner.model.compute_logits(hidden[: len(targets)])
            total_nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            predicted += len(targets)
    return {"perplexity": math.exp(total_nll / predicted), "tokens": predicted, "window": window, "chunk": chunk,
            "corpus": corpus_fingerprint(), "weight_bytes": runner.model.weight_bytes,
            "kv_bytes_per_token": runner.kv_bytes_per_block() / block_size}
