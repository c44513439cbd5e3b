"""A fixed English corpus present on every machine: docstrings of a pinned set of Python standard-library
modules, read from their source with ``ast`` (never imported), in a fixed order.

Every compression method is compared on exactly these tokens; ``corpus_fingerprint()`` identifies the text so
that figures from different machines (or Python versions, whose docstrings may differ) are not confused.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys

# Modules with plentiful prose docstrings; pinned so the corpus does not depend on what else is installed.
MODULES = ("argparse", "collections/__init__", "dataclasses", "functools", "json/__init__", "logging/__init__",
           "pathlib", "subprocess", "textwrap", "threading", "typing", "unittest/case")


def _source_path(module: str) -> str:
    name = module.replace("/__init__", "").replace("/", ".")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"standard-library module {name} not found")
    return spec.origin


def _docstrings(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > 80:  # one-liners carry little language
                docs.append(doc)
    return docs


def stdlib_docstrings() -> str:
    """The corpus text: every selected docstring, separated by blank lines."""
    return "\n\n".join(doc for module in MODULES for doc in _docstrings(_source_path(module)))


CALIBRATION_PASSAGES = 256


def _passages() -> list[str]:
    return stdlib_docstrings().split("\n\n")


def calibration_texts(n: int = CALIBRATION_PASSAGES, max_chars: int = 2000) -> list[str]:
    """The first ``n`` passages, for importance estimates; evaluation never sees them."""
    return [p[:max_chars] for p in _passages()[:min(n, CALIBRATION_PASSAGES)]]


def evaluation_text() -> str:
    """The corpus after the calibration passages: what perplexity is measured on."""
    return "\n\n".join(_passages()[CALIBRATION_PASSAGES:])


def training_modules() -> list[str]:
    """Every other top-level pure-Python standard-library module, sorted: none of the pinned modules' files (so
    none of the evaluation text) is among them."""
    pinned = {module.split("/")[0] for module in MODULES}
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in pinned:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            names.append(name)
    return names


def training_texts() -> list[str]:
    """Text to train on (distillation): the calibration passages, then every docstring of ``training_modules()``
    (about 0.65 M characters on Python 3.11). Never the evaluation text."""
    texts = calibration_texts()
    for name in training_modules():
        try:
            texts += _docstrings(importlib.util.find_spec(name).origin)
        except (OSError, SyntaxError, UnicodeDecodeError):  # a vendor-patched file: skip it, the rest is plenty
            continue
    return texts


def corpus_fingerprint() -> str:
    return hashlib.sha256(stdlib_docstrings().encode()).hexdigest()[:12]
