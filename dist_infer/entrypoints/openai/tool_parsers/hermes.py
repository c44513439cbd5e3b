"""Hermes-style tool calls, as Qwen2.5, Qwen3, SmolLM3 and Hermes models write them (vLLM's ``hermes``)::

    Let me look that up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"zone": "CET"}}
    </tool_call>

Content is the text before the first ``<tool_call>``; text between and after the calls is dropped. The last
call's closing tag may be missing (the model stopped on its end-of-turn token). A call that is not a JSON call
object makes the whole output plain content.
"""

from __future__ import annotations

from dist_infer.entrypoints.openai.tool_parsers.base import (Extraction, ToolCallParser, complete_call,
                                                            partial_call, partial_tag_len)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolCallParser):
    def extract(self, text: str, final: bool) -> Extraction | None:
        first = text.find(START)
        if first == -1:
            return Extraction(text if final else text[:len(text) - partial_tag_len(text, START)])
        calls = []
        start = first
        while start != -1:
            body = start + len(START)
            end = text.find(END, body)
            if end == -1 and not final:  # the call being written
                calls.append(partial_call(text[:len(text) - partial_tag_len(text, END)], body))
                break
            region = text[body:] if end == -1 else text[body:end]
            done = complete_call(region, 0)
            if done is None or region[done[1]:].strip():
                return None
            calls.append(done[0])
            start = -1 if end == -1 else text.find(START, end + len(END))
        return Extraction(text[:first], calls)
