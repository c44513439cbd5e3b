"""Llama 3.1 / 3.2 JSON tool calls (vLLM's ``llama3_json``): the whole answer is one or more call objects,
``{"name": "get_weather", "parameters": {"city": "Paris"}}``, apart by ``;``, possibly after
``<|python_tag|>`` (a special token: it shows only when special tokens are kept). ``"arguments"`` is read as
well as ``"parameters"``. An answer that does not start with ``{`` (after whitespace) is plain content; one
that starts with ``{`` but is not a sequence of call objects is plain content too, once it is complete.
"""

from __future__ import annotations

from dist_infer.entrypoints.openai.tool_parsers.base import Extraction, ToolCallParser, call_sequence

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolCallParser):
    def extract(self, text: str, final: bool) -> Extraction | None:
        body = len(PYTHON_TAG) if text.startswith(PYTHON_TAG) else 0
        if not final and not body and PYTHON_TAG.startswith(text):
            return Extraction("")  # may become the tag
        start = len(text) - len(text[body:].lstrip())
        if start == len(text):  # only whitespace so far: an answer or calls may follow
            return Extraction(text if final else "")
        if text[start] != "{":
            return Extraction(text)
        calls = call_sequence(text, start, final, ";")
        return None if calls is None else Extraction("", calls)
