"""One chat prompt builder for every entry point: the template's text, its ids without a second BOS."""

from __future__ import annotations

import asyncio

import pytest

from dist_infer import SamplingParams
from dist_infer.entrypoints.chat_utils import as_conversations, chat_prompt

CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def test_chat_prompt_is_the_template_without_a_second_bos(tokenizer):
    prompt = chat_prompt(tokenizer, CONVERSATION)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert prompt == {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    bare = chat_prompt(tokenizer, CONVERSATION, add_generation_prompt=False)
    assert text.startswith(bare["prompt"]) and bare["prompt"] != text
    custom = chat_prompt(tokenizer, CONVERSATION, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert custom["prompt"] == "[What is the capital of France?]"


def test_a_tokenizer_without_a_template_is_refused(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tokenizer, CONVERSATION)


def test_one_conversation_or_many():
    assert as_conversations(CONVERSATION) == [CONVERSATION]
    assert as_conversations([CONVERSATION, CONVERSATION]) == [CONVERSATION, CONVERSATION]
    assert as_conversations([]) == []


def test_the_ray_service_builds_the_same_prompt_as_llm_chat(tiny_llama_with_tokenizer):
    """LLMService is the named actor's body; here it runs in this process, without Ray."""
    from dist_infer import LLM
    from dist_infer.entrypoints.ray_service import LLMService

    params = SamplingParams(temperature=0, max_tokens=4)
    with LLM(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22) as llm:
        local = llm.chat(CONVERSATION, params, use_tqdm=False)[0]
    service = LLMService({"model": tiny_llama_with_tokenizer, "kv_cache_memory": 1 << 22})
    try:
        remote = asyncio.run(service.chat([CONVERSATION], [params]))[0]
    finally:
        asyncio.run(service.shutdown())
    assert (remote.prompt, remote.prompt_token_ids) == (local.prompt, local.prompt_token_ids)
    assert remote.outputs[0].token_ids == local.outputs[0].token_ids
