"""Activation statistics of the decoder blocks' linear layers, shared by the pruning methods that look at inputs.

For a linear ``y = x W^T`` (W ``[out, in]``) fed calibration tokens ``X [T, in]``, the statistic is the L2 norm
of every input channel over the tokens, ``||X_j||_2 = sqrt(sum_t x_tj^2)`` ``[in]`` (accumulated in float64:
many tokens). Wanda scores weights with it; structured pruning scores whole channels.

Two ways to gather it:

* ``input_norms``: one pass of the unpruned model over the text (every layer sees the original activations);
* ``sequential_input_norms``: block by block as in the Wanda and SparseGPT code: the inputs of block 0 are
  captured once, then for each block its norms are gathered, the caller prunes it, and its outputs are recomputed
  with the pruned weights to be the next block's inputs, so every block is measured on what it will really see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
LINEARS = tuple(f"{part}.{name}" for part, names in PROJECTIONS.items() for name in names)


@contextlib.contextmanager
def _squared_sums(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, every forward through ``modules[key]`` adds ``sum_t x_tj^2`` of its input to ``sums[key]``."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(key):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + x.double().square().sum(0)
        return accumulate

    for key, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook(key)))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def _block_linears(layer: nn.Module) -> dict[str, nn.Module]:
    return {key: layer.get_submodule(key) for key in LINEARS}


def input_norms(model, layers: list[nn.Module], batches: list[torch.Tensor],
                show_progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """``||X_j||_2`` ``[in]`` (float64) of every block linear (keyed as ``LINEARS``), per layer, from one pass."""
    modules = {(i, key): linear for i, layer in enumerate(layers) for key, linear in _block_linears(layer).items()}
    with _squared_sums(modules) as sums:
        for ids in tqdm(batches, desc="calibrating", disable=not show_progress, leave=False):
            model.model(input_ids=ids, use_cache=False)  # the decoder alone: lm_head plays no part
    return [{key: sums[(i, key)].sqrt() for key in LINEARS} for i in range(len(layers))]


class _Captured(Exception):
    """Stops the model once the first block's inputs are recorded: nothing after it is needed."""


def _first_block_inputs(model, layers: list[nn.Module], batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of block 0's call per batch: the embedded tokens plus the mask and rotary embeddings
    that the model computes once and hands to every block."""
    captured = []

    def record(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Captured):
                model.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # older transformers return a tuple


def sequential_input_norms(model, layers: list[nn.Module], batches: list[torch.Tensor],
                           prune: Callable[[int, nn.Module, dict[str, torch.Tensor]], None],
                           show_progress: bool = False) -> None:
    """For each block ``i`` in order: gather ``||X_j||_2`` of its linears on inputs produced by the (already
    pruned) blocks before it, call ``prune(i, block, norms)``, then recompute its outputs with the pruned weights
    as the next block's inputs."""
    calls = _first_block_inputs(model, layers, batches)
    for i, layer in enumerate(tqdm(layers, desc="pruning blocks", disable=not show_progress, leave=False)):
        with _squared_sums(_block_linears(layer)) as sums:
            for args, kwargs in calls:
                layer(*args, **kwargs)
        prune(i, layer, {key: total.sqrt() for key, total in sums.items()})
        if i + 1 < len(layers):
            calls = [((_hidden(layer(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in calls]
