"""The request fields of tool calling, in OpenAI's shapes: ``tools`` (functions with a JSON-schema
``parameters``, checked to be a valid schema), a named ``tool_choice``, and an assistant message's
``tool_calls``. Like the other request bodies (see ``protocol``), unknown fields are kept so that they can be
named in ``x-ignored-fields``, and types are strict."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


class _ToolBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionDefinition(_ToolBody):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        if not _FUNCTION_NAME.fullmatch(value):
            raise ValueError(f"function names are 1 to 64 of a-z, A-Z, 0-9, _ and -, got {value!r}")
        return value

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value):
        if value is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as e:
                raise ValueError(f"not a valid JSON schema: {e.message}") from None
        return value


class Tool(_ToolBody):
    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict:
        """What chat templates iterate: ``{"type": "function", "function": {"name", "description", ...}}``."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True,
                                                                         include=set(FunctionDefinition.model_fields))}


class FunctionName(_ToolBody):
    name: str


class NamedToolChoice(_ToolBody):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_ToolBody):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(_ToolBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
