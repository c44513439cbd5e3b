"""Chat conversations into prompts, in one place for ``LLM.chat``, the named Ray service, the OpenAI server and
the CLI."""

from __future__ import annotations


def chat_prompt(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None, template_kwargs: dict | None = None,
                tools: list[dict] | None = None) -> dict:
    """``{"prompt": text, "prompt_token_ids": ids}`` for one conversation, rendered by the tokenizer's chat
    template (or ``chat_template``). The template already holds any BOS token, so none is added again.
    ``template_kwargs`` go to ``apply_chat_template`` (``continue_final_message``, template variables).

    ``tools``: the functions the model may call, in Hugging Face's tool-use layout (``{"type": "function",
    "function": {"name", "description", "parameters"}}``), which the template renders (a template that does
    not know tools ignores them). Messages may carry an assistant's ``tool_calls`` (arguments as dicts) and
    ``tool`` results with their ``tool_call_id``, as the same layout has them."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass chat_template= or use generate()")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template, tools=tools or None,
                                         **(template_kwargs or {}))
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def as_conversations(messages) -> list:
    """One conversation (a list of message dicts) or a list of them, as a list of conversations."""
    return [messages] if messages and isinstance(messages[0], dict) else list(messages)
