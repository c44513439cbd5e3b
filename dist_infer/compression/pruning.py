"""Offline pruning of Llama-family Hugging Face checkpoints (Llama, Mistral, Qwen2).

Only the decoder blocks' linear layers are touched (``q/k/v/o_proj``, ``gate/up/down_proj``; weights are
``[out_features, in_features]``); embeddings, norms and ``lm_head`` never are.

* ``unstructured``: zero a ``sparsity`` fraction of each layer's weights, those of lowest score.
* ``2:4``: in every run of 4 consecutive weights of a row (along the input dimension) keep the 2 of highest score.
  Always exactly 50 %: the ``sparsity`` argument does not apply and is ignored.
* ``structured``: remove whole KV groups (one KV head plus the ``num_heads / num_kv_heads`` query heads that
  share it) and whole MLP channels, giving smaller dense matrices and an updated config. The same number is
  removed in every layer (the config stays uniform), chosen per layer by ``||X_c||_2 * ||W[:, c]||_2`` measured on
  calibration text (``activation_stats``).

Scores for the two masking methods:

* ``wanda`` (default, ``wanda.py``): ``|W_ij| * ||X_j||_2`` with the input-channel norms measured block by block on
  calibration text, compared within each output row (unstructured drops ``round(sparsity * in)`` per row);
* ``magnitude``: ``|W_ij|``, no text needed; unstructured drops exactly ``round(sparsity * numel)`` per layer.

Measured on SmolLM2-135M (``dist-infer eval-ppl``, 4096 tokens; fp32 15.17), calibrating on the pinned corpus's
256 passages (~10k tokens): 50 % unstructured magnitude 410, Wanda 26.7; 2:4 magnitude 1834, Wanda 73.9;
structured 25 % 81.8 (96.7 when channels were scored by ``mean |x_c|`` instead of ``||X_c||_2``).

The two masking methods write dense weights with zeros; exploiting the zeros at run time is not done here.
Removing whole decoder blocks is ``layer_drop.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dist_infer.compression.activation_stats import PROJECTIONS, input_norms
from dist_infer.compression.calibration import calibration_batches, transformers_progress
from dist_infer.compression.masks import check_two_four, magnitude_mask, two_four_mask
from dist_infer.compression.side_files import copy_side_files
from dist_infer.compression.wanda import prune_wanda

PRUNING_METHODS = ("unstructured", "2:4", "structured")
SCORES = ("wanda", "magnitude")
CHANNEL_ALIGNMENT = 8  # remaining MLP channels per tensor-parallel rank, when the size allows


def prune_checkpoint(src: str, dest: str, method: str, sparsity: float = 0.5,
                     tensor_parallel_size: int = 1, calibration_texts: list[str] | None = None,
                     show_progress: bool = True, score: str = "wanda") -> dict:
    """Prune the Hugging Face folder ``src`` with ``method`` and write a complete Hugging Face folder to ``dest``.

    ``score`` (``unstructured`` and ``2:4`` only): ``wanda`` (``|W_ij| * ||X_j||_2`` compared per output row,
    calibrated on ``calibration_texts``, default the pinned corpus) or ``magnitude`` (``|W_ij|``, per layer, no text).

    Returns a summary: ``method``, ``sparsity`` (requested; 0.5 for 2:4), ``achieved_sparsity`` (fraction of the
    original block-linear weights that are now zero or removed), ``pruned_linears`` (layers touched), and for
    ``structured`` the sizes ``{heads,kv_heads,intermediate}_{before,after}``.
    """
    _validate(src, dest, method, sparsity, tensor_parallel_size)
    if score not in SCORES:
        raise ValueError(f"unknown pruning score {score!r}; valid scores: {', '.join(SCORES)}")
    if method == "2:4" and sparsity != 0.5:
        warnings.warn(f"2:4 pruning always removes exactly half of the weights; sparsity={sparsity} is ignored")
    sparsity = 0.5 if method == "2:4" else sparsity
    from transformers import AutoModelForCausalLM

    with transformers_progress(show_progress), torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        layers = _decoder_layers(model)
        before = sum(linear.weight.numel() for _, linear in _block_linears(layers))
        summary = {"method": method, "sparsity": float(sparsity)}
        if method == "structured":
            summary.update(_prune_structured(model, layers, src, sparsity, tensor_parallel_size,
                                             calibration_texts, show_progress))
        else:
            summary["score"] = score
            _prune_masked(model, layers, src, method, sparsity, score, calibration_texts, show_progress)
        linears = _block_linears(layers)
        remaining = sum(int(torch.count_nonzero(linear.weight)) for _, linear in linears)
        summary.update(achieved_sparsity=1.0 - remaining / before, pruned_linears=len(linears), dest=str(dest))
        _save(model, src, dest)
    return summary


def _validate(src: str, dest: str, method: str, sparsity: float, tp: int) -> None:
    if method not in PRUNING_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods: {', '.join(PRUNING_METHODS)}")
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    validate_paths(src, dest)


def validate_paths(src: str, dest: str) -> None:
    """``src`` must be a Hugging Face folder, and ``dest`` another place (the source is read while writing)."""
    if not os.path.isfile(os.path.join(str(src), "config.json")):
        raise ValueError(f"source checkpoint not found: {src} (expected a Hugging Face folder with config.json)")
    if os.path.exists(dest) and os.path.realpath(dest) == os.path.realpath(src):
        raise ValueError(f"dest must differ from src ({src}): the source weights are read while writing")


def _decoder_layers(model) -> list[nn.Module]:
    """The decoder blocks, checked to carry the Llama-family projections (``_block_linears`` relies on them)."""
    layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    if not layers or not all(isinstance(getattr(getattr(layer, part, None), n, None), nn.Linear)
                             for layer in layers for part, names in PROJECTIONS.items() for n in names):
        raise ValueError(f"unsupported architecture {type(model).__name__}: expected a Llama-family decoder")
    return layers


def _block_linears(layers: list[nn.Module]) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` for every prunable projection, named as in the checkpoint."""
    return [(f"model.layers.{i}.{part}.{n}", getattr(getattr(layer, part), n))
            for i, layer in enumerate(layers) for part, names in PROJECTIONS.items() for n in names]


def _prune_masked(model, layers: list[nn.Module], src: str, method: str, sparsity: float, score: str,
                  texts: list[str] | None, show_progress: bool) -> None:
    linears = _block_linears(layers)
    for name, linear in linears if method == "2:4" else ():  # every shape first: fail before any work is done
        check_two_four(name, linear.in_features)
    if score == "wanda":
        batches = calibration_batches(src, texts, model.config.vocab_size, "Wanda pruning")
        prune_wanda(model, layers, batches, method, sparsity, show_progress)
        return
    for _, linear in tqdm(linears, desc=f"pruning ({method})", disable=not show_progress, leave=False):
        w = linear.weight
        w.mul_(magnitude_mask(w, sparsity) if method == "unstructured" else two_four_mask(w))


def groups_to_remove(num_heads: int, num_kv_heads: int, sparsity: float, tp: int,
                     accepts: Callable[[int, int], bool] | None = None) -> int:
    """KV groups to remove: the count nearest ``round(sparsity * num_kv_heads)`` (ties: fewer) that leaves at least
    one group, KV heads valid for ``tp``, query heads divisible by ``tp``, and ``accepts(heads, kv_heads)``."""
    group, target = num_heads // num_kv_heads, round(sparsity * num_kv_heads)
    # dist-infer shards KV heads over the ranks (kv % tp == 0) or replicates them (tp % kv == 0)
    valid = [r for r in range(num_kv_heads) for kv in [num_kv_heads - r] if (kv % tp == 0 or tp % kv == 0)
             and (kv * group) % tp == 0 and (accepts is None or accepts(kv * group, kv))]
    if not valid:
        raise ValueError(f"no number of remaining attention heads fits tensor_parallel_size={tp} "
                         f"(num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}"
                         f"{'' if accepts is None else ', and sizes transformers can load'})")
    return min(valid, key=lambda r: (abs(r - target), r))


def _transformers_accepts(config, head_dim: int) -> Callable[[int, int], bool]:
    """Whether transformers can load the config with fewer heads: e.g. ``LlamaConfig`` insists on
    ``hidden_size % num_attention_heads == 0`` even when ``head_dim`` is explicit; Qwen2 and Mistral do not."""
    base = config.to_dict()

    def accepts(heads: int, kv_heads: int) -> bool:
        try:
            type(config).from_dict({**base, "head_dim": head_dim, "num_attention_heads": heads,
                                    "num_key_value_heads": kv_heads})
        except Exception:  # noqa: BLE001 - transformers' strict validators raise non-ValueError types too
            return False
        return True

    # If even the unpruned sizes fail to round-trip, this check knows nothing: let every size through.
    return accepts if accepts(config.num_attention_heads, config.num_key_value_heads) else (lambda h, kv: True)


def channels_to_remove(intermediate_size: int, sparsity: float, tp: int) -> int:
    """MLP channels to remove: the count nearest ``round(sparsity * intermediate_size)`` (ties: fewer) leaving a
    positive intermediate size divisible by ``tp``, and by ``CHANNEL_ALIGNMENT * tp`` when the model is that big
    (per-rank sizes that are multiples of 8 suit GPU matmul tiles; costs at most a few channels of the target)."""
    if intermediate_size < tp:
        raise ValueError(f"intermediate_size={intermediate_size} cannot be split over tensor_parallel_size={tp}")
    step = tp * CHANNEL_ALIGNMENT if intermediate_size >= tp * CHANNEL_ALIGNMENT else tp
    target = round(sparsity * intermediate_size)
    valid = [intermediate_size - step * k for k in range(1, intermediate_size // step + 1)]
    return min(valid, key=lambda r: (abs(r - target), r))


def measure_importance(model, layers: list[nn.Module], batches: list[torch.Tensor], num_kv_heads: int,
                       show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of every KV group ``[L, num_kv_heads]`` and MLP channel ``[L, intermediate]``.

    Channel ``c`` of a projection's input scores ``||X_c||_2 * ||W[:, c]||_2`` (how much output it carries; the
    same activation statistic as Wanda, ``activation_stats.input_norms``). A KV group scores the sum over its query
    heads' slice of ``o_proj``'s input (``G * head_dim`` channels, ``G = num_heads / num_kv_heads``); an MLP channel
    is one input channel of ``down_proj``.
    """
    norms = input_norms(model, layers, batches, show_progress)

    def score(layer, layer_norms, key):
        return layer_norms[key] * layer.get_submodule(key).weight.double().norm(dim=0)

    heads, channels = [], []
    for layer, layer_norms in zip(layers, norms):
        heads.append(score(layer, layer_norms, "self_attn.o_proj").reshape(num_kv_heads, -1).sum(-1))
        channels.append(score(layer, layer_norms, "mlp.down_proj"))
    return torch.stack(heads), torch.stack(channels)


def _most_important(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in their original order (a stable sort breaks ties by position)."""
    return torch.argsort(scores, descending=True, stable=True)[:keep].sort().values


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output features ``rows`` (weight rows and bias entries)."""
    linear.weight = nn.Parameter(linear.weight[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rows].clone())
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    """Keep input features ``columns``; the output (and so the bias) keeps its size."""
    linear.weight = nn.Parameter(linear.weight[:, columns].clone())
    linear.in_features = len(columns)


def _slice_attention(attn: nn.Module, kept_groups: torch.Tensor, group: int, head_dim: int) -> None:
    """Keep KV groups ``kept_groups``: rows ``[g*D, (g+1)*D)`` of k/v and ``[g*G*D, (g+1)*G*D)`` of q (and the
    same columns of ``o_proj``); HF's ``repeat_kv`` pairs KV head ``g`` with query heads ``g*G .. g*G+G-1``."""
    kv_rows = (kept_groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q_rows = (kept_groups[:, None] * group * head_dim + torch.arange(group * head_dim)).flatten()
    _keep_rows(attn.q_proj, q_rows)
    _keep_rows(attn.k_proj, kv_rows)
    _keep_rows(attn.v_proj, kv_rows)
    _keep_columns(attn.o_proj, q_rows)


def _prune_structured(model, layers, src, sparsity, tp, texts, show_progress) -> dict:
    config = model.config
    heads, intermediate = config.num_attention_heads, config.intermediate_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    remove_groups = groups_to_remove(heads, kv, sparsity, tp, _transformers_accepts(config, head_dim))
    remove_channels = channels_to_remove(intermediate, sparsity, tp)
    batches = calibration_batches(src, texts, config.vocab_size, "structured pruning")
    head_scores, channel_scores = measure_importance(model, layers, batches, kv, show_progress)
    for i, layer in enumerate(layers):
        _slice_attention(layer.self_attn, _most_important(head_scores[i], kv - remove_groups), heads // kv, head_dim)
        kept = _most_important(channel_scores[i], intermediate - remove_channels)
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            _keep_rows(proj, kept)
        _keep_columns(layer.mlp.down_proj, kept)
    # Pin head_dim first: without it transformers would derive hidden_size // num_attention_heads (now wrong).
    config.head_dim = head_dim
    new_kv = kv - remove_groups
    config.num_attention_heads, config.num_key_value_heads = new_kv * (heads // kv), new_kv
    config.intermediate_size = intermediate - remove_channels
    return dict(heads_before=heads, heads_after=config.num_attention_heads, kv_heads_before=kv,
                kv_heads_after=new_kv, intermediate_before=intermediate, intermediate_after=config.intermediate_size,
                tensor_parallel_size=tp)


def _save(model, src: str, dest: str) -> None:
    """Weights (safetensors) and config via ``save_pretrained`` in the source's half precision if it had one
    (``dtype``, or v4's ``torch_dtype``), then the tokenizer files copied verbatim."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(raw.get("dtype") or raw.get("torch_dtype")))
    if dtype is not None:  # pruning ran in fp32; zeros stay zeros when cast back
        model.to(dtype)
        model.config.dtype = dtype
    os.makedirs(dest, exist_ok=True)
    model.save_pretrained(dest)
    copy_side_files(src, dest)
