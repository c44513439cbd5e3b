"""JSON Lines files, read with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator


def read_jsonl(path: str) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for every non-blank line; a ValueError ``path:line: not valid JSON``."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
