"""The files of a Hugging Face folder that a rewritten checkpoint keeps as they are: tokenizer, chat template
and generation defaults (the tools write the weights and config.json themselves)."""

from __future__ import annotations

import fnmatch
import os
import shutil

SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
              "*.tiktoken", "*.jinja", "chat_template.json", "generation_config.json")


def copy_side_files(src: str, dest: str) -> None:
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and any(fnmatch.fnmatch(name, pattern) for pattern in SIDE_FILES):
            shutil.copy2(path, os.path.join(dest, name))
