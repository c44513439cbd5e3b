"""A tool-call parser on a growing text -> OpenAI's streamed deltas.

Each ``feed`` extracts from all the text so far and sends what is new: content, then for each call a first
delta ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}`` as soon as its name is
complete, then ``{"index", "function": {"arguments": piece}}`` as its arguments grow. Because extraction is
monotone (see ``base``) the concatenated deltas equal ``parse`` of the whole text. The last ``feed``
(``final=True``) reads the text as finished: held-back text is sent, and an output that turns out not to be
well-formed tool calls is sent as content, unless a call was already sent (deltas cannot be taken back).
"""

from __future__ import annotations

import logging
import uuid

from dist_infer.entrypoints.openai.tool_parsers.base import Extraction, ToolCallParser

logger = logging.getLogger("dist_infer.server")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.text = ""
        self._content = 0  # characters of content sent
        self._arguments: list[str] = []  # per call sent: its arguments text sent
        self._broken = False  # an extraction contradicted what was sent: send nothing more

    @property
    def called(self) -> bool:
        """Whether a tool call was sent."""
        return bool(self._arguments)

    def feed(self, delta: str, final: bool = False) -> dict:
        """The new text -> the delta to send (``{}``, ``{"content"}``, ``{"tool_calls"}`` or both)."""
        self.text += delta
        extraction = self.parser.extract(self.text, final)
        if extraction is None:
            if not final or self.called:
                return {}
            extraction = Extraction(self.text)
        return {} if self._broken else self._diff(extraction)

    def _diff(self, extraction: Extraction) -> dict:
        out: dict = {}
        if len(extraction.content) > self._content:
            out["content"] = extraction.content[self._content:]
            self._content = len(extraction.content)
        calls = []
        for index, call in enumerate(extraction.calls):
            if call.name is None:
                break  # later calls wait: indices go out in order
            entry: dict = {"index": index}
            if index == len(self._arguments):
                self._arguments.append("")
                entry.update(id=new_call_id(), type="function", function={"name": call.name, "arguments": ""})
            sent = self._arguments[index]
            if not call.arguments.startswith(sent):
                logger.warning("tool-call stream: the arguments of call %d changed after they were sent; the "
                               "rest of this choice's calls are not streamed", index)
                self._broken = True
                break
            if len(call.arguments) > len(sent):
                entry.setdefault("function", {})["arguments"] = call.arguments[len(sent):]
                self._arguments[index] = call.arguments
            if len(entry) > 1:
                calls.append(entry)
        if calls:
            out["tool_calls"] = calls
        return out
