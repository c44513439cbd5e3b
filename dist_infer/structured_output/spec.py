"""A structured-output spec -> the one grammar it names, as (kind, text): the key of the compile cache.

Kinds are xgrammar's compile entry points: ``json`` (a JSON schema's text), ``json_object`` (any JSON object),
``regex`` and ``grammar`` (EBNF). A ``choice`` of strings becomes the grammar ``root ::= "a" | "b" | ...``.
``check_spec`` parses the grammar without a tokenizer (cheap, no vocabulary), so that a bad spec is refused
where the request is made, not on a worker mid-step.
"""

from __future__ import annotations

import functools
import json
from typing import NamedTuple

# JSON is generated without optional whitespace: a weak (or random) model otherwise spends its tokens on spaces
# and newlines the grammar allows, and runs out of max_tokens before the document closes (vLLM's
# ``disable_any_whitespace``), and compactly (no space after "," and ":").
ANY_WHITESPACE = False
SEPARATORS = (",", ":")


class GrammarSpec(NamedTuple):
    kind: str  # "json" | "json_object" | "regex" | "grammar"
    text: str  # the schema's JSON text, the regex, the EBNF; "" for json_object
    field: str  # the StructuredOutputsParams field it came from (for error messages)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose sentences are exactly ``choices``: JSON string literals are valid xgrammar EBNF literals."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _bounded_strings_without_control_chars(schema: str | dict) -> str:
    """The schema's JSON text, with every string that has ``minLength``/``maxLength`` (and no ``pattern`` or
    ``format``) given the equivalent ``pattern`` of unescaped characters other than control characters.

    Why: xgrammar 0.2 turns a length-bounded string into {min,max} characters other than a quote, a backslash,
    CR or LF, which lets raw control characters (U+0000-U+001F) through, and JSON forbids them unescaped (a
    random model does emit them). A ``pattern`` is compiled as a JSON-string regex that keeps them out. Not valid JSON text: returned as is
    (``check_spec`` says so)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            return schema

    def fix(node):
        if isinstance(node, list):
            return [fix(v) for v in node]
        if not isinstance(node, dict):
            return node
        node = {k: fix(v) for k, v in node.items()}
        lengths = [node.get("minLength"), node.get("maxLength")]
        if (node.get("type") == "string" and any(isinstance(n, int) for n in lengths)
                and "pattern" not in node and "format" not in node):
            low = lengths[0] if isinstance(lengths[0], int) else 0
            high = lengths[1] if isinstance(lengths[1], int) else ""
            node["pattern"] = f'^[^"\\\\\\x00-\\x1f]{{{low},{high}}}$'
        return node

    return json.dumps(fix(schema))


def spec_of(params) -> GrammarSpec:
    """``params``: a ``StructuredOutputsParams`` (duck-typed: this package does not import sampling_params)."""
    if params.json is not None:
        return GrammarSpec("json", _bounded_strings_without_control_chars(params.json), "json")
    if params.json_object:
        return GrammarSpec("json_object", "", "json_object")
    if params.regex is not None:
        return GrammarSpec("regex", params.regex, "regex")
    if params.choice is not None:
        return GrammarSpec("grammar", choice_grammar(params.choice), "choice")
    return GrammarSpec("grammar", params.grammar, "grammar")


def check_spec(params) -> None:
    """Raises ``ValueError("structured_outputs.<field>: invalid ...")`` when the grammar does not parse."""
    spec = spec_of(params)
    if spec.kind == "json":
        try:
            schema = json.loads(spec.text)
        except ValueError as e:
            raise ValueError(f"structured_outputs.json: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"structured_outputs.json: a JSON schema is an object, got {type(schema).__name__}")
    error = _parse_error(spec.kind, spec.text)
    if error is not None:
        what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(spec.kind, spec.kind)
        raise ValueError(f"structured_outputs.{spec.field}: invalid {what}: {error}")


@functools.lru_cache(maxsize=256)
def _parse_error(kind: str, text: str) -> str | None:
    import xgrammar as xgr

    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text, any_whitespace=ANY_WHITESPACE, separators=SEPARATORS,
                                         strict_mode=True)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(text)
    except Exception as e:  # xgrammar raises RuntimeError or its own error types for a bad input
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None
