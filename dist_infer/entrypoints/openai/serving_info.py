"""Routes that answer about the model without running it, in vLLM's shapes: ``/v1/models``, ``/tokenize``,
``/detokenize`` and ``/version``.

``/tokenize`` takes ``{"prompt": text, "add_special_tokens": true}`` (tokenized as ``/v1/completions``
tokenizes a text prompt) or ``{"messages": [...], "add_generation_prompt": true, "add_special_tokens": false}``
(rendered by the chat template as ``/v1/chat/completions`` renders it, ``tools`` included) and answers
``{"count", "max_model_len", "tokens"}``, plus ``token_strs`` (the tokenizer's own token strings) with
``return_token_strs``. ``/detokenize`` takes ``{"tokens": [...]}`` and answers ``{"prompt": text}``. Both take
an optional ``model``, which must be the served one.
"""

from __future__ import annotations

import time
import uuid

import dist_infer
from dist_infer.entrypoints.chat_utils import chat_prompt
from dist_infer.entrypoints.openai.errors import OpenAIError
from dist_infer.entrypoints.openai.protocol import (DetokenizeRequest, TokenizeChatRequest,
                                                    TokenizeCompletionRequest)


class ModelInfo:
    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int | None:
        return getattr(getattr(self.engine, "model_config", None), "max_model_len", None)

    def _tokenizer(self, model: str | None):
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                              param="model", code="model_not_found")
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise OpenAIError(400, "this server runs without a tokenizer (skip_tokenizer_init)",
                              code="no_tokenizer")
        return tokenizer

    def models(self) -> dict:
        """vLLM's model card: OpenAI's fields plus ``root``, ``parent``, ``max_model_len`` and ``permission``
        (``root`` is the served name: the checkpoint's path on this machine means nothing to a client)."""
        permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": self.created,
                      "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                      "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                      "organization": "*", "group": None, "is_blocking": False}
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dist-infer",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len,
                "permission": [permission]}
        return {"object": "list", "data": [card]}

    def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        tokenizer = self._tokenizer(req.model)
        if isinstance(req, TokenizeChatRequest):
            try:
                text = chat_prompt(tokenizer, req.conversation(), req.add_generation_prompt,
                                   template_kwargs=req.template_kwargs(), tools=req.template_tools())["prompt"]
            except Exception as e:  # the template rejects the conversation
                raise OpenAIError(400, f"messages: {e}", param="messages", code="invalid_messages") from None
        else:
            text = req.prompt
        tokens = tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        body = {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}
        if req.return_token_strs:
            body["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
        return body

    def detokenize(self, req: DetokenizeRequest) -> dict:
        tokenizer = self._tokenizer(req.model)
        size = len(tokenizer)
        bad = next((t for t in req.tokens if not 0 <= t < size), None)
        if bad is not None:
            raise OpenAIError(400, f"tokens: {bad} is outside the tokenizer's vocabulary [0, {size})",
                              param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(req.tokens)}

    @staticmethod
    def version() -> dict:
        return {"version": dist_infer.__version__}
