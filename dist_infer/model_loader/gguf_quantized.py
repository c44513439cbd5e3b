"""GGUF tensors in 4-bit block formats, read straight into dist-infer's int4 layout (no fp32 round trip).

llama.cpp's Q4_0 and Q4_1 store each row in blocks of 32 values: an fp16 scale ``d`` (and, for Q4_1, an fp16
minimum ``m``) and 16 bytes of 4-bit codes (byte j holds value j in its low nibble and value j+16 in its
high one). They decode as ``w = (q - 8) d`` (Q4_0) and ``w = q d + m`` (Q4_1), which is exactly int4 with
group size 32, scale ``d`` and zero point ``8`` or ``-m/d``.
"""

from __future__ import annotations

import numpy as np
import torch

Q4_BLOCK = 32


def _codes(blocks: np.ndarray) -> np.ndarray:
    """[rows, nblocks, 16] bytes -> [rows, nblocks * 32] codes in value order."""
    low, high = blocks & 0x0F, blocks >> 4
    return np.concatenate([low, high], axis=-1).reshape(blocks.shape[0], -1)


def decode_q4(data: np.ndarray, kind: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_0 / Q4_1 bytes of a [rows, cols] tensor -> (q uint8 [rows, cols], scale [rows, G], zero [rows, G])."""
    if cols % Q4_BLOCK:
        raise ValueError(f"{kind} tensor with {cols} columns is not whole {Q4_BLOCK}-value blocks")
    nblocks = cols // Q4_BLOCK
    width = 20 if kind == "Q4_1" else 18
    raw = np.ascontiguousarray(data).reshape(rows, nblocks, width)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = _codes(raw[..., 4:])
    else:
        m = None
        codes = _codes(raw[..., 2:])
    q = torch.from_numpy(codes.astype(np.uint8))
    scale = torch.from_numpy(d)
    if m is None:
        zero = torch.full_like(scale, 8.0)
    else:
        m_t = torch.from_numpy(m)
        flat = scale == 0  # a constant block: represent it as (0 - z) * s = m
        scale = torch.where(flat, m_t.abs().clamp(min=1e-12), scale)
        zero = -m_t / scale
        q = q.view(rows, nblocks, Q4_BLOCK).masked_fill(flat[..., None], 0).view(rows, cols)
    return q, scale, zero


def permute_rows(tensors: tuple[torch.Tensor, ...], permutation: np.ndarray) -> tuple[torch.Tensor, ...]:
    index = torch.from_numpy(permutation.astype(np.int64))
    return tuple(t[index].contiguous() for t in tensors)


def quantized_tensors_from_gguf(path: str, skeleton, arch: str, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF file under its Hugging Face name; the decoder-layer linears as int4 (group 32)
    q / scale / zero -- taken directly from Q4_0 / Q4_1 blocks, or quantized from other formats."""
    from gguf import GGUFReader, dequantize
    from tqdm.auto import tqdm
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from dist_infer.layers.quantization.math import quantize_int4
    from dist_infer.layers.quantization.targets import LINEAR

    config = load_gguf_checkpoint(path)["config"]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    out: dict[str, torch.Tensor] = {}
    for tensor in tqdm(GGUFReader(path).tensors, desc="Reading GGUF tensors", disable=not show_progress):
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue
        shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists the fastest dimension first
        kind = tensor.tensor_type.name
        if LINEAR.match(hf_name) and len(shape) == 2:
            rows, cols = shape
            if kind in ("Q4_0", "Q4_1"):
                q, scale, zero = decode_q4(tensor.data, kind, rows, cols)
            else:
                weights = torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type)))
                q, scale, zero = quantize_int4(weights.reshape(rows, cols).float(), Q4_BLOCK)
            # llama.cpp stores Q and K rows permuted for its rotary layout; undo it row-wise (codes and scales).
            order = processor.process(weights=np.arange(rows), name=tensor.name, tensor_key_mapping=names,
                                      parsed_parameters={"tensors": {}, "config": config}).weights
            q, scale, zero = permute_rows((q, scale, zero), np.asarray(order))
            base = hf_name[: -len(".weight")]
            out.update({f"{base}.weight_q": q, f"{base}.weight_scale": scale, f"{base}.weight_zero": zero})
        else:
            weights = dequantize(tensor.data, tensor.tensor_type)
            weights = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names,
                                        parsed_parameters={"tensors": {}, "config": config}).weights
            out[hf_name] = torch.from_numpy(np.array(weights, dtype=np.float32)).reshape(shape)
    return out
