"""Request bodies of the OpenAI API subset we serve, with vLLM's extensions, validated with pydantic.

Three kinds of field:

* **supported** ones are declared below and reach ``SamplingParams`` (see ``request_params``): OpenAI's, plus
  vLLM's extensions under vLLM's names (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
  ``ignore_eos``, ``skip_special_tokens``, ``spaces_between_special_tokens``, ``include_stop_str_in_output``,
  ``bad_words``, ``allowed_token_ids``, ``prompt_logprobs``, ``add_generation_prompt``,
  ``continue_final_message``, ``chat_template_kwargs``, ``stream_options.continuous_usage_stats``,
  ``priority``), structured outputs: OpenAI's ``response_format`` (``json_object``, ``json_schema``),
  vLLM's ``structured_outputs`` object and its older ``guided_json``, ``guided_regex``, ``guided_choice``,
  ``guided_grammar`` (at most one of them per request), and tool calling (``tools``, ``tool_choice``,
  ``parallel_tool_calls``, assistant messages with ``tool_calls``, ``tool`` messages; see ``tool_calls``);
* **refused** ones (``REFUSED``) are OpenAI or vLLM features this server does not have yet (audio, the legacy
  ``functions`` API, ...). Ignoring them would answer a different question than the one asked, so a request
  that sets one (to anything but its no-op value, e.g. ``functions: []``) gets a 400 naming the field and
  saying it is not supported;
* **unknown** ones (any other name, at any level: ``stream_options.foo``, ``messages[].reasoning_content``)
  follow vLLM: they are ignored and logged as a warning once per field name. Unlike vLLM, the client is told
  too: the response carries ``x-ignored-fields: name, other.name`` (see ``ignored_fields``). This keeps
  benchmark and evaluation tools that send their own vendor fields working, and a typo visible.

Field types are strict (``"1"`` is not a number, ``1`` is not a bool).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dist_infer.entrypoints.openai.errors import OpenAIError
from dist_infer.entrypoints.openai.tool_protocol import NamedToolChoice, Tool, ToolCall

logger = logging.getLogger("dist_infer.server")

MAX_LOGPROBS = 20
_MAX_N = 16
_MAX_STOP = 16
_TOOLS = "the legacy functions API is not supported; send tools and tool_choice"

# name -> (its no-op values, which are accepted, and why the field is refused). ``None`` is always a no-op.
REFUSED: dict[str, tuple[tuple, str]] = {
    "functions": (([],), _TOOLS), "function_call": (("none",), _TOOLS),
    "audio": ((), "audio output is not supported"), "modalities": ((["text"],), "only text output is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "web search is not supported"),
    "chat_template": ((), "a request cannot bring its own chat template; the model's is used"),
    "suffix": (("",), "insertion (suffix) is not supported"),
}
_CHAT_ONLY_REFUSED = {"functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
                      "chat_template"}

# apply_chat_template's own parameters: chat_template_kwargs must not reach them (they change what is rendered
# or what is returned, and each that a client may set has its own field).
_TEMPLATE_RESERVED = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                      "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


class _Body(BaseModel):
    """Unknown fields are kept (``model_extra``) so that ``ignored_fields`` can name them."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk (only with include_usage)


class JsonSchemaFormat(_Body):
    """OpenAI's ``response_format.json_schema``: ``schema`` (a JSON schema; absent: any JSON object)."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` (``StructuredOutputsParams``' fields)."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Refusing(_Body):
    """Declares the refused fields it may meet (as anything) and refuses them when set."""

    refused_fields: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data):
        if isinstance(data, dict):
            for name in cls.refused_fields:
                value = data.get(name)
                no_ops, why = REFUSED[name]
                if value is not None and value not in no_ops:
                    raise OpenAIError(400, f"{name}: not supported by this server ({why})", param=name,
                                      code="unsupported_parameter")
        return data


class _SamplingFields(_Refusing):
    """Fields both endpoints share."""

    model: str
    n: int = Field(1, ge=1, le=_MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a JSON key, a string) -> bias in [-100, 100]
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > _MAX_STOP:
            raise ValueError(f"at most {_MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        for key, bias in (value or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key):
                raise ValueError(f"keys must be token ids (strings of digits), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return value

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, value):
        if any(t < 0 for t in value or ()):
            raise ValueError("token ids must be >= 0")
        return value

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, value):
        if any(not w.strip() for w in value or ()):
            raise ValueError("bad words must not be empty")
        return value

    @property
    def continuous_usage(self) -> bool:
        """vLLM: usage in every streamed chunk, only when the final usage is asked for too."""
        return bool(self.stream_options and self.stream_options.include_usage
                    and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingFields):
    refused_fields: ClassVar[frozenset[str]] = frozenset(REFUSED) - _CHAT_ONLY_REFUSED
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: score the prompt alone
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and any(isinstance(v, list) and not v for v in value):
            raise ValueError("token id lists must not be empty")
        return value


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (its content may then be None)
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        for call in self.tool_calls or ():
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(f"tool_calls: the arguments of {call.function.name} must be a JSON object, got "
                                 f"{call.function.arguments[:80]!r}")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it (Hugging Face's tool-use layout): an assistant's calls with
        their arguments as a dict (templates iterate or ``tojson`` them), a tool result with its call's id."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                message["name"] = self.name
        return message


class _ChatTemplating(_Body):
    """How a conversation becomes a prompt (chat completions and /tokenize)."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True  # open the assistant's turn after the messages
    continue_final_message: bool = False  # leave the last (assistant) message open, to be continued
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template, e.g. enable_thinking
    tools: list[Tool] | None = None  # functions the model may call, shown to it by the template

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value):
        reserved = sorted(set(value or ()) & _TEMPLATE_RESERVED)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set here (a parameter of the template call "
                             f"itself, not a template variable)")
        return value

    @model_validator(mode="after")
    def _one_open_turn(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        return self

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value):
        names = [t.function.name for t in value or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"function names must be unique, {', '.join(twice)} repeats")
        return value

    def conversation(self) -> list[dict]:
        return [m.for_template() for m in self.messages]

    def template_tools(self) -> list[dict] | None:
        return [t.for_template() for t in self.tools] if self.tools else None

    def template_kwargs(self) -> dict:
        return {**(self.chat_template_kwargs or {}), "continue_final_message": self.continue_final_message}


class ChatCompletionRequest(_ChatTemplating, _SamplingFields):
    refused_fields: ClassVar[frozenset[str]] = frozenset(REFUSED) - {"suffix"}
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # vLLM: the answer starts with the last message's content when it is the assistant's
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool | None = None  # False: at most one call (enforced with required or named)

    @model_validator(mode="after")
    def _tool_choice(self):
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice other than none needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        return self

    @property
    def tool_mode(self) -> str:
        """``none``, ``auto``, ``required`` or ``named`` (OpenAI's default: auto when there are tools)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")


# ---- vLLM's /tokenize and /detokenize ----------------------------------------------------------------------

class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_ChatTemplating):
    model: str | None = None
    add_special_tokens: bool = False  # the template already holds the special tokens it wants
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- unknown fields ---------------------------------------------------------------------------------------

_MAX_WARNED = 1000  # field names warned about once each; past this many, no more (a client can send any names)
_MAX_LISTED = 32  # names in one x-ignored-fields header
_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,64}")
_warned: set[str] = set()


def ignored_fields(body: BaseModel) -> list[str]:
    """Names of the fields ``body`` ignored, dotted from the top (``stream_options.foo``, ``messages[].bar``),
    each once, in order. Logs a warning the first time a name is seen. A name that is not a plain identifier
    (it would go into a header and the log) is listed as ``<N unprintable>``."""
    found: list[str] = []
    stack: list[tuple[str, BaseModel]] = [("", body)]
    while stack:
        prefix, model = stack.pop(0)
        known = getattr(type(model), "refused_fields", ())  # set to a no-op value: not worth a mention
        found.extend(prefix + name for name in (model.model_extra or {}) if name not in known)
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                stack.append((f"{prefix}{name}.", value))
            elif isinstance(value, list):
                stack.extend((f"{prefix}{name}[].", v) for v in value if isinstance(v, BaseModel))
    names = list(dict.fromkeys(n for n in found if _NAME.fullmatch(n)))
    odd = len(set(found)) - len(names)
    new = [n for n in names if n not in _warned]
    if new and len(_warned) < _MAX_WARNED:
        _warned.update(new)
        logger.warning("ignored request fields this server does not know: %s (told to the client in the "
                       "x-ignored-fields header; further requests with these fields are not logged)", ", ".join(new))
    listed = names[:_MAX_LISTED]
    if len(names) > _MAX_LISTED:
        listed.append(f"<{len(names) - _MAX_LISTED} more>")
    if odd:
        listed.append(f"<{odd} unprintable>")
    return listed
