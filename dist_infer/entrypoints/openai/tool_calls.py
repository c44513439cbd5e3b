"""Tool calls in chat completions: which parser reads a request's output, what ``tool_choice`` forces, and
the answer's ``message.tool_calls`` or streamed tool-call deltas.

``tool_choice`` (OpenAI's default: ``auto`` when the request has tools, else ``none``):

* ``none``: the tools are still shown to the model (the template renders them); the output is plain content;
* ``auto``: the model may call; its output is read by the server's ``--tool-call-parser`` (its own format,
  e.g. Hermes ``<tool_call>`` JSON). As in vLLM this needs ``--enable-auto-tool-choice``, else a 400;
* ``required`` / a named function: the grammar engine forces a call (``tool_choice_constraint``): the output
  is a JSON array of ``{"name", "parameters"}`` objects (at most one with ``parallel_tool_calls: false``), or
  the named function's arguments object. The constraint goes to ``SamplingParams.structured_outputs`` when
  this build has structured outputs; without them the output is read the same way but not enforced.

A message with calls has ``content`` (the text before them) or None, and ``tool_calls`` ``[{"id": "call_...",
"type": "function", "function": {"name", "arguments"}}]``; a choice that ended on its own after a call has
``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import dataclasses

from dist_infer.entrypoints.openai.errors import OpenAIError
from dist_infer.entrypoints.openai.protocol import ChatCompletionRequest
from dist_infer.entrypoints.openai.tool_parsers import get_tool_parser
from dist_infer.entrypoints.openai.tool_parsers.base import ToolCallParser
from dist_infer.entrypoints.openai.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser
from dist_infer.entrypoints.openai.tool_parsers.streaming import ToolCallStream, new_call_id
from dist_infer.entrypoints.openai.tool_protocol import Tool
from dist_infer.sampling_params import SamplingParams


def tool_choice_constraint(tools: list[Tool], tool_choice, parallel_tool_calls: bool | None = True) -> dict | None:
    """The JSON schema of the output that ``tool_choice`` forces, or None (``none`` / ``auto``): the named
    function's parameters, or for ``required`` an array of one or more ``{"name": <a tool>, "parameters":
    <its schema>}`` (at most one when ``parallel_tool_calls`` is false)."""
    by_name = {t.function.name: t.function.parameters or {"type": "object"} for t in tools or ()}
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                  "required": ["name", "parameters"]} for name, schema in by_name.items()]
        array = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if parallel_tool_calls is False:
            array["maxItems"] = 1
        return array
    return by_name[tool_choice.function.name]


def output_parser(req: ChatCompletionRequest, parser_name: str | None, auto_enabled: bool) -> ToolCallParser | None:
    """How this request's output is read: None for plain content. A 400 for ``auto`` on a server without
    ``--enable-auto-tool-choice`` and ``--tool-call-parser`` (vLLM's rule and flags)."""
    mode = req.tool_mode
    if mode == "none":
        return None
    if mode == "named":
        return NamedFunctionParser(req.tool_choice.function.name)
    if mode == "required":
        return RequiredCallsParser()
    if not (auto_enabled and parser_name):
        raise OpenAIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
                               'be set (tools without tool_choice mean auto; tool_choice "none", "required" or a '
                               'named function work without them)', param="tool_choice", code="invalid_value")
    return get_tool_parser(parser_name)


def constrained(params: SamplingParams, req: ChatCompletionRequest) -> SamplingParams:
    """``params`` with the output ``tool_choice`` forces, when this build has structured outputs."""
    schema = tool_choice_constraint(req.tools, req.tool_choice, req.parallel_tool_calls)
    if schema is None or "structured_outputs" not in {f.name for f in dataclasses.fields(params)}:
        return params
    from dist_infer.sampling_params import StructuredOutputsParams

    return dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=schema))


def message(parser: ToolCallParser | None, text: str, finish_reason: str | None, echo: str = ""
            ) -> tuple[dict, str | None]:
    """A finished choice's ``message`` and ``finish_reason``."""
    content, calls = parser.parse(text) if parser is not None else (text, [])
    if not calls:
        return {"role": "assistant", "content": echo + text}, finish_reason
    tool_calls = [{"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
                  for name, arguments in calls]
    return ({"role": "assistant", "content": echo + (content or "") or None, "tool_calls": tool_calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


class ChoiceStream:
    """One choice's streamed deltas: plain content, or read by ``parser`` into content and tool-call deltas."""

    def __init__(self, parser: ToolCallParser | None):
        self._stream = ToolCallStream(parser) if parser is not None else None

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        if self._stream is None:
            return ({"content": text} if text else {}), finish_reason
        delta = self._stream.feed(text, final=finish_reason is not None)
        if finish_reason == "stop" and self._stream.called:
            finish_reason = "tool_calls"
        return delta, finish_reason
