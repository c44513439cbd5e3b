"""Loading a Hugging Face safetensors checkpoint into a model, generically.

The checkpoint is one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``. Files are
memory-mapped and each tensor is handed to its parameter's ``weight_loader`` as a lazy slice, so a
parameter that holds only part of a tensor (a tensor-parallel shard) reads only that part. The model says
which parameter each checkpoint tensor fills (``checkpoint_targets``); anything unknown, missing or of the
wrong shape is an error naming the tensor.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable

from safetensors import safe_open
from torch import nn

from dist_infer.layers.shard import default_weight_loader

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(folder: str) -> dict[str, list[str]]:
    """file path -> tensor names in it (names listed once the file is opened, for a single file)."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            files[os.path.join(folder, file)].append(name)
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint shard {os.path.basename(path)} listed in {INDEX_FILE} is missing from {folder}")
        return dict(files)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return {single: []}
    raise FileNotFoundError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")


def load_weights(model: nn.Module, folder: str, after_each: Callable[[], None] | None = None) -> None:
    """Fills every parameter of ``model`` from the checkpoint in ``folder``; ``after_each`` runs after every
    tensor (to watch memory, say)."""
    params = dict(model.named_parameters())
    loaded: dict[str, set] = defaultdict(set)
    for path, listed in checkpoint_files(folder).items():
        with safe_open(path, framework="pt", device="cpu") as f:
            names = listed or list(f.keys())
            for name in names:
                targets = model.checkpoint_targets(name)
                if targets is None:
                    raise ValueError(f"unexpected tensor {name!r} in {os.path.basename(path)}: the model has no such weight")
                for param_name, shard_id in targets:
                    param = params.get(param_name)
                    if param is None:
                        raise ValueError(f"unexpected tensor {name!r}: the model has no parameter {param_name!r}")
                    try:
                        loader = getattr(param, "weight_loader", default_weight_loader)
                        loader(param, f.get_slice(name), shard_id)
                    except ValueError as e:
                        raise ValueError(f"tensor {name!r}: {e}") from None
                    loaded[param_name].add(shard_id)
                if targets and after_each is not None:
                    after_each()
    missing = [
        name for name in params
        if not model.expected_shards(name) <= loaded.get(name, set())
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint in {folder} is missing weights for: {shown}")
