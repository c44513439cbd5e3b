"""Tool-call parsers: a model's text -> content and OpenAI tool calls, whole (``parse``) or streamed
(``streaming.ToolCallStream``). One module per format; the server picks one with ``--tool-call-parser``
(vLLM's names). ``forced`` reads the outputs ``tool_choice`` required / named forces."""

from __future__ import annotations

from dist_infer.entrypoints.openai.tool_parsers.base import ToolCallParser
from dist_infer.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from dist_infer.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolCallParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def get_tool_parser(name: str) -> ToolCallParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
