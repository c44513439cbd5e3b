"""Loading the checkpoint's tokenizer and finding its end-of-sequence tokens."""

from __future__ import annotations

import os

from dist_infer.config import ModelConfig


def load_tokenizer(model_config: ModelConfig):
    """The checkpoint's ``transformers`` tokenizer, or None with ``skip_tokenizer_init``."""
    if model_config.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    path = model_config.tokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load a tokenizer from {path} ({e}); add tokenizer files, or pass "
            f"skip_tokenizer_init=True and give prompts as token ids"
        ) from None


def eos_token_ids(model_config: ModelConfig, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    ids = None
    if os.path.isfile(os.path.join(model_config.model, "generation_config.json")):
        from transformers import GenerationConfig

        ids = GenerationConfig.from_pretrained(model_config.model, local_files_only=True).eos_token_id
    if ids is None:
        ids = getattr(model_config.hf_config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)
