"""Checks a prompt and its sampling settings and turns them into token ids, before anything is queued."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_infer.config import ModelConfig
from dist_infer.sampling_params import SamplingParams


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    max_tokens: int
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # for SamplingParams.bad_words_token_ids


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer):
        self.model_config, self.tokenizer = model_config, tokenizer

    def process(self, prompt, params: SamplingParams) -> ProcessedPrompt:
        """``prompt`` is a string, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}`` (optionally with "prompt")."""
        text, ids = self._tokens(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids holds {bad!r}, outside the vocabulary [0, {vocab})")
        if params.stop_strings and self.tokenizer is None:
            # Stop strings are matched in the detokenized text, which there is none of without a tokenizer.
            raise ValueError(
                f"stop={list(params.stop_strings)!r} needs a tokenizer, but this engine was built with "
                f"skip_tokenizer_init=True; use stop_token_ids instead"
            )
        if params.bad_words and self.tokenizer is None:
            raise ValueError(
                f"bad_words={params.bad_words!r} needs a tokenizer, but this engine was built with "
                f"skip_tokenizer_init=True; use logit_bias with -100 or allowed_token_ids instead"
            )
        for name, tokens in (("allowed_token_ids", params.allowed_token_ids), ("logit_bias", params.logit_bias)):
            out = next((t for t in tokens or () if t >= vocab), None)
            if out is not None:
                raise ValueError(f"{name} holds token id {out}, outside the vocabulary [0, {vocab})")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs={params.logprobs} exceeds the vocabulary size ({vocab})")
        limit = self.model_config.max_model_len
        if len(ids) >= limit:
            raise ValueError(
                f"prompt is {len(ids)} tokens, too long for the model's context (max_model_len={limit}) "
                f"with room for at least one generated token"
            )
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = limit - len(ids)
        elif len(ids) + max_tokens > limit:
            raise ValueError(
                f"max_tokens={max_tokens} with a {len(ids)}-token prompt exceeds the model's context "
                f"(max_model_len={limit}); lower max_tokens to at most {limit - len(ids)}"
            )
        return ProcessedPrompt(text, list(ids), max_tokens, self._bad_words(params))

    def _bad_words(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word's token ids, as vLLM: tokenized as given (without its leading spaces) and after a
        space, since most tokenizers spell a word inside a text differently from one at its start."""
        sequences: list[list[int]] = []
        for word in params.bad_words or ():
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def _tokens(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise ValueError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string or a dict, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("the tokenizer is skipped (skip_tokenizer_init=True): give prompts as {'prompt_token_ids': [...]}")
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt, self.tokenizer.encode(prompt)
