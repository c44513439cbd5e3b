"""Layer dropping by Block Influence (ShortGPT, Men et al., 2024): remove whole decoder blocks of a Llama-family
Hugging Face checkpoint.

A block that barely turns the hidden state changes little. With ``h_i`` ``[T, hidden]`` the hidden state entering
block ``i`` and ``h_{i+1}`` the one leaving it, measured on calibration text,

    BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t]),

and the ``num_layers`` blocks of lowest BI go (ties: the earlier block). The last block is never dropped: its output
is what the final norm and ``lm_head`` were trained on, so its BI says nothing about how replaceable it is (the norm
rescales any direction), and removing it would hand the head a hidden state of another kind. The remaining blocks
are renumbered 0..L'-1 and the config's ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) follow.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from dist_infer.compression.calibration import calibration_batches, transformers_progress
from dist_infer.compression.pruning import _decoder_layers, _save, validate_paths

PER_LAYER_CONFIG_FIELDS = ("layer_types", "no_rope_layers")


def layers_to_drop(fraction: float, num_layers: int) -> int:
    """Blocks to drop for a ``fraction`` of ``num_layers``: ``round(fraction * num_layers)`` (half to even), at most
    ``num_layers - 1`` since the last block always stays."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction of layers to drop must be in [0, 1), got {fraction!r}")
    return min(round(fraction * num_layers), num_layers - 1)


def block_influence(model, layers: list[nn.Module], batches: list[torch.Tensor],
                    show_progress: bool = False) -> list[float]:
    """``BI_i`` per block from one pass of the model over ``batches`` (cosines accumulated in float64)."""
    sums = [0.0] * len(layers)
    tokens = 0

    def hook(index):
        def accumulate(module, args, kwargs, output):
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(entering.double(), leaving.double(), dim=-1)
            sums[index] += float(cos.sum())
        return accumulate

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in tqdm(batches, desc="block influence", disable=not show_progress, leave=False):
            model.model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - total / tokens for total in sums]


def _keep_layers(model, kept: list[int]) -> None:
    """Keep decoder blocks ``kept`` (ascending), renumbered from 0 (attention's ``layer_idx`` picks its cache slot)."""
    config, before = model.config, len(model.model.layers)
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for field in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == before:
            setattr(config, field, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def drop_layers(src: str, dest: str, num_layers: int, calibration_texts: list[str] | None = None,
                show_progress: bool = True) -> dict:
    """Drop the ``num_layers`` decoder blocks of lowest Block Influence from the Hugging Face folder ``src`` and
    write a complete Hugging Face folder (weights, config, tokenizer files) to ``dest``.

    Returns ``num_layers_before``, ``num_layers_after``, ``block_influence`` (BI per original block), ``dropped``
    (original indices, ascending) and ``dest``.
    """
    validate_paths(src, dest)
    from transformers import AutoModelForCausalLM

    with transformers_progress(show_progress), torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        layers = _decoder_layers(model)
        total = len(layers)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < total:
            raise ValueError(f"num_layers must be an integer from 1 to {total - 1} (the model has {total} decoder "
                             f"blocks and the last always stays), got {num_layers!r}")
        batches = calibration_batches(src, calibration_texts, model.config.vocab_size, "layer dropping")
        influence = block_influence(model, layers, batches, show_progress)
        candidates = sorted(range(total - 1), key=lambda i: (influence[i], i))
        dropped = sorted(candidates[:num_layers])
        _keep_layers(model, [i for i in range(total) if i not in dropped])
        _save(model, src, dest)
    return dict(num_layers_before=total, num_layers_after=total - num_layers, block_influence=influence,
                dropped=dropped, dest=str(dest))
