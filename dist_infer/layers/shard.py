"""Reading a slice of a checkpoint tensor, whether it is already a tensor or a lazy safetensors slice.

``safe_open(...).get_slice(name)`` returns an object that reads only the rows or columns it is indexed
with, so a tensor-parallel rank that narrows before reading never touches the rest of the file.
"""

from __future__ import annotations

from typing import Any

import torch

TensorSource = Any  # torch.Tensor or safetensors PySafeSlice


def source_shape(src: TensorSource) -> tuple[int, ...]:
    if isinstance(src, torch.Tensor):
        return tuple(src.shape)
    return tuple(src.get_shape())


def narrow(src: TensorSource, dim: int, start: int, length: int) -> torch.Tensor:
    """``src[..., start:start+length, ...]`` along ``dim``, read from disk only for that range."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, length)
    index = [slice(None)] * len(src.get_shape())
    index[dim] = slice(start, start + length)
    return src[tuple(index)]


def read_all(src: TensorSource) -> torch.Tensor:
    if isinstance(src, torch.Tensor):
        return src
    return src[:]


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies ``src`` into ``dst`` (casting dtype); a shape mismatch is a ValueError naming both shapes."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch: checkpoint slice has {tuple(src.shape)}, parameter expects {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def check_dim(src: TensorSource, dim: int, expected: int) -> None:
    shape = source_shape(src)
    if len(shape) <= dim or shape[dim] != expected:
        raise ValueError(f"shape mismatch: checkpoint tensor has shape {shape}, expected size {expected} in dim {dim}")


def default_weight_loader(param: torch.Tensor, loaded: TensorSource, shard_id=None) -> None:
    """For parameters every rank holds whole (norms): the full tensor, shape-checked."""
    copy_into(param.data, read_all(loaded))
