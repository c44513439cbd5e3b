"""The outputs that ``tool_choice`` forces (the grammar engine keeps the model to them; see ``tool_calls``):

* a named function: the output *is* that function's arguments object, streamed as it comes;
* ``required``: the output is a JSON array of ``{"name": ..., "parameters": {...}}`` objects (vLLM's form).

Both are model-independent: the call is read from the constrained output, not from the model's own format.
"""

from __future__ import annotations

from dist_infer.entrypoints.openai.tool_parsers.base import (Extraction, PartialCall, ToolCallParser,
                                                            call_sequence)


class NamedFunctionParser(ToolCallParser):
    def __init__(self, name: str):
        self.name = name

    def extract(self, text: str, final: bool) -> Extraction | None:
        return Extraction("", [PartialCall(self.name, text)])

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        return None, [(self.name, text)]


class RequiredCallsParser(ToolCallParser):
    def extract(self, text: str, final: bool) -> Extraction | None:
        calls = call_sequence(text, 0, final, "[,]")
        return None if calls is None else Extraction("", calls)
