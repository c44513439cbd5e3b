"""``dist-infer quantize``: a checkpoint whose decoder-layer linears are stored quantized, loaded later as is.

Each ``X.weight`` of a q/k/v/o or gate/up/down projection becomes ``X.weight_q`` (int8, or uint8 codes 0..15
for int4), ``X.weight_scale`` and, for int4, ``X.weight_zero`` (see ``layers/quantization/math.py``); every
other tensor is copied unchanged, and config.json records the method under ``quantization_config``. The
tensors keep the checkpoint's layout, so tensor-parallel ranks slice them as they would the weights.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dist_infer.compression.side_files import copy_side_files
from dist_infer.layers.quantization.config import QuantConfig
from dist_infer.layers.quantization.math import quantize_int4, quantize_int8
from dist_infer.layers.quantization.targets import LINEAR
from dist_infer.model_loader.weights import checkpoint_files

def quantized_tensors(name: str, weight: torch.Tensor, config: QuantConfig) -> dict[str, torch.Tensor]:
    """The stored form of one linear weight [out, in]."""
    base = name[: -len(".weight")]
    if config.method == "int8":
        q, scale = quantize_int8(weight)
        return {f"{base}.weight_q": q, f"{base}.weight_scale": scale}
    q, scale, zero = quantize_int4(weight, config.group_size)
    return {f"{base}.weight_q": q, f"{base}.weight_scale": scale, f"{base}.weight_zero": zero}


def write_quantized_config(src: str, dest: str, config: QuantConfig) -> None:
    with open(os.path.join(src, "config.json")) as f:
        data = json.load(f)
    if "quantization_config" in data:
        raise ValueError(f"{src} is already quantized ({data['quantization_config']})")
    data["quantization_config"] = config.checkpoint_entry()
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(data, f, indent=2)


ALGORITHMS = ("rtn", "gptq")


def quantize_checkpoint(src: str, dest: str, method: str, group_size: int = 64, show_progress: bool = True,
                        algorithm: str = "rtn", calibration_texts: list[str] | None = None) -> dict:
    """Writes the quantized form of the Hugging Face folder ``src`` to ``dest``; returns a summary.

    ``algorithm="rtn"`` rounds every weight to its nearest level (what ``quantization=`` does at load time);
    ``"gptq"`` lets later columns absorb each column's rounding error, measured on ``calibration_texts``
    (default: the pinned calibration passages), see ``compression/gptq.py``."""
    from dist_infer.model_loader.resolve import resolve_model_path

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown quantization algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    src = resolve_model_path(src)
    config = QuantConfig(method, group_size, prequantized=True)
    precomputed = {}
    if algorithm == "gptq":
        from dist_infer.compression.gptq import gptq_checkpoint_tensors

        precomputed = gptq_checkpoint_tensors(src, method, group_size, calibration_texts, show_progress)
    os.makedirs(dest, exist_ok=True)
    write_quantized_config(src, dest, config)
    copy_side_files(src, dest)
    out: dict[str, torch.Tensor] = {}
    quantized = 0
    for path, listed in checkpoint_files(src).items():
        with safe_open(path, framework="pt", device="cpu") as f:
            names = listed or list(f.keys())
            for name in tqdm(names, desc=f"Quantizing to {method}", disable=not show_progress):
                tensor = f.get_tensor(name)
                if name in precomputed:
                    base = name[: -len(".weight")]
                    out.update({f"{base}.weight_{part}": t for part, t in precomputed[name].items()})
                    quantized += 1
                elif LINEAR.match(name):
                    out.update(quantized_tensors(name, tensor, config))
                    quantized += 1
                else:
                    out[name] = tensor.contiguous()
    save_file(out, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return {"method": method, "algorithm": algorithm, "group_size": group_size if method == "int4" else None,
            "linears_quantized": quantized, "bytes": os.path.getsize(os.path.join(dest, "model.safetensors"))}
