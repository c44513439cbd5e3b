"""What every tool-call parser shares: the call objects models write, read whole or as they grow.

A parser turns a model's text into ``Extraction(content, calls)``. ``extract(text, final=False)`` reads a text
that is still growing: it must be *monotone*, each field of a later extraction extending the earlier one's
(content longer, more calls, a call's name appearing once, its arguments text longer), so that a stream can
send the differences (see ``streaming``) and still end with exactly what ``parse`` of the whole text gives. So
a growing text holds back what may still change meaning: a suffix that may be the start of a tool-call tag,
the ``}`` and whitespace at the end of an arguments object (they may close the call object instead).

A call is a JSON object ``{"name": ..., "arguments": {...}}`` (or ``"parameters"``, Llama 3's key). Its
arguments are the model's own text of that object when ``name`` comes first (the usual order), which a
stream can send piece by piece; otherwise the object re-serialized, sent when the call is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_DECODER = json.JSONDecoder()
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')  # a call object's start, its name complete
_ARGS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')  # then its arguments' key
_OPEN_TAIL = re.compile(r"[\s}]*\Z")  # what may close the call object rather than its arguments


@dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str = ""  # the arguments' JSON text so far


@dataclass
class Extraction:
    content: str  # text for the message's content (before any call)
    calls: list[PartialCall] = field(default_factory=list)


class ToolCallParser:
    """One model family's tool-call format."""

    def extract(self, text: str, final: bool) -> Extraction | None:
        """``text`` read so far (``final``: all of it). None: the text is not a well-formed tool-call output
        (then the whole text is the answer's content, as vLLM does)."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """A finished output -> (content or None, [(function name, arguments JSON text)])."""
        extraction = self.extract(text, final=True)
        if extraction is None or not extraction.calls:
            return text, []
        return extraction.content or None, [(c.name, c.arguments) for c in extraction.calls]


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (held back: it may become
    the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def complete_call(text: str, pos: int) -> tuple[PartialCall, int] | None:
    """The complete call object at ``text[pos:]`` (after whitespace) and the index past it; None when there is
    no complete JSON object there, or it is not a call."""
    start = len(text) - len(text[pos:].lstrip())
    try:
        obj, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    value = obj.get(key, {})
    if isinstance(value, str):  # some models write the arguments as a JSON string
        return PartialCall(obj["name"], value), end
    head = _HEAD.match(text, start)
    args = _ARGS.match(text, head.end()) if head else None
    if isinstance(value, dict) and args is not None and text.startswith("{", args.end()):
        _, value_end = _DECODER.raw_decode(text, args.end())
        return PartialCall(obj["name"], text[args.end():value_end]), end
    return PartialCall(obj["name"], json.dumps(value, ensure_ascii=False)), end


def partial_call(text: str, pos: int) -> PartialCall:
    """What is known of the unfinished call object at ``text[pos:]``: its name once complete, then its
    arguments' text so far when they are an object that follows the name."""
    head = _HEAD.match(text, pos)
    if head is None:
        return PartialCall(None)
    name = json.loads(f'"{head.group(1)}"')
    args = _ARGS.match(text, head.end())
    if args is None or not text.startswith("{", args.end()):
        return PartialCall(name)
    rest = text[args.end():]
    return PartialCall(name, rest[:_OPEN_TAIL.search(rest).start()])


def call_sequence(text: str, pos: int, final: bool, separators: str) -> list[PartialCall] | None:
    """Call objects one after the other from ``pos``, apart by whitespace and ``separators``; the last may be
    unfinished unless ``final``. None when something else is there."""
    calls: list[PartialCall] = []
    skip = re.compile(rf"[\s{re.escape(separators)}]*")
    while True:
        pos = skip.match(text, pos).end()
        if pos == len(text):
            return calls
        if text[pos] != "{":
            return None
        done = complete_call(text, pos)
        if done is None:
            if final:
                return None
            calls.append(partial_call(text, pos))
            return calls
        calls.append(done[0])
        pos = done[1]
