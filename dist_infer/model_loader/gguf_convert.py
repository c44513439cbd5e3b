"""GGUF file -> Hugging Face style folder (config.json, model.safetensors, tokenizer files).

``transformers`` reads the GGUF metadata into a config and a tokenizer and dequantizes the tensors (undoing
llama.cpp's Q/K row permutation); we write them out with ``safetensors``. The folder is built under a
temporary name and renamed into place while holding a file lock, so two processes converting the same file
at once both end up reading one complete folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

# GGUF ``general.architecture`` -> our model class, for the architectures whose metadata and tensors
# transformers' GGUF loader can describe. Fields it does not read keep its config defaults (Gemma 2's soft-caps
# and query_pre_attn_scalar, Gemma 3's local RoPE base and global RoPE scaling, Phi-3's LongRoPE factors,
# Qwen3's head_dim).
_HF_ARCHITECTURE = {
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(sorted(_HF_ARCHITECTURE))
# keep_quantization reads Q4 blocks under the Llama family's tensor layout only.
KEEP_QUANTIZATION_ARCHITECTURES = ("llama", "mistral", "qwen2")


def gguf_architecture(gguf_path: str | os.PathLike) -> str:
    """The file's ``general.architecture``; a llama.cpp Mixtral (``llama`` with experts) is a ValueError, as
    transformers' GGUF loader reads no expert tensors for it."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{gguf_path}: not a model GGUF file (no general.architecture)")
    arch = field.contents()
    experts = reader.fields.get(f"{arch}.expert_count")
    if arch in ("llama", "mistral") and experts is not None and experts.contents():
        raise ValueError(f"{gguf_path}: a mixture-of-experts {arch!r} GGUF (Mixtral) cannot be converted: "
                         f"transformers' GGUF loader does not map its expert tensors; GGUF architectures supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return arch


def convert_gguf(src: str | os.PathLike, dest: str | os.PathLike, *, overwrite: bool = False,
                 keep_quantization: bool = False) -> Path:
    """Converts ``src`` (a GGUF file of one of ``SUPPORTED_GGUF_ARCHITECTURES``) into the folder ``dest``; returns
    ``dest``.

    With ``keep_quantization`` the decoder-layer linears are written as a dist-infer int4 (group 32)
    checkpoint, 4-bit GGUF blocks taken over as they are; otherwise every tensor is dequantized to fp32.
    Safe to call from several processes at once: the first converts, the others wait and reuse its folder.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    if not overwrite and _is_complete(dest):
        # A folder is renamed into place only once complete, so this needs no lock; and it skips parsing the
        # GGUF's metadata (its tokenizer's vocabulary: seconds) on every start after the first.
        return dest
    arch = gguf_architecture(src)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{src}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    if keep_quantization and arch not in KEEP_QUANTIZATION_ARCHITECTURES:
        raise ValueError(f"{src}: keeping GGUF quantization is supported for "
                         f"{', '.join(KEEP_QUANTIZATION_ARCHITECTURES)} only, not {arch!r}; convert without "
                         f"keep_quantization (dequantized)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if _is_complete(dest):
            if not overwrite:
                return dest
            shutil.rmtree(dest)
        elif dest.exists():
            raise FileExistsError(f"{dest} exists and is not a converted model folder; remove it or choose another")
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            _write_folder(src, tmp, arch, keep_quantization)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _write_folder(src: Path, out: Path, arch: str, keep_quantization: bool = False) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    out.mkdir(parents=True)
    folder, name = str(src.parent), src.name

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.architectures = [_HF_ARCHITECTURE[arch]]
    # Dequantized values are not exact in 16 bits, so the folder keeps them in fp32.
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)

    # transformers maps GGUF tensor names through a model skeleton; on the meta device it costs no memory.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if keep_quantization:
        from dist_infer.layers.quantization.config import QuantConfig
        from dist_infer.model_loader.gguf_quantized import Q4_BLOCK, quantized_tensors_from_gguf

        tensors = quantized_tensors_from_gguf(str(src), skeleton, arch)
        data = json.loads((out / "config.json").read_text())
        data["quantization_config"] = QuantConfig("int4", Q4_BLOCK).checkpoint_entry()
        (out / "config.json").write_text(json.dumps(data, indent=2))
    else:
        # Dequantizes tensor by tensor with a tqdm bar of its own.
        parsed = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
        tensors = {k: v.contiguous() for k, v in parsed["tensors"].items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": src.name})
