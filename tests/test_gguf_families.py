"""GGUF files of the newer families convert and keep parity with the Hugging Face model they were written from;
architectures transformers cannot describe are refused with the supported ones named.

The files are written here as llama.cpp's converter would (its tensor names, Gemma's norms stored as ``1 + w``)
with the ``gguf`` package, with a tiny byte-level BPE tokenizer (a real vocabulary costs ~20 s to convert).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

from conftest import save_tiny_model
from dist_infer import LLM
from dist_infer.model_loader.gguf_convert import SUPPORTED_GGUF_ARCHITECTURES, convert_gguf
from parallel_helpers import assert_matches_reference, drive_outputs, hf_reference

# The 256 byte tokens, one merge and an end-of-text token.
VOCAB = 258
# Only fields transformers' GGUF loader reads differ from the config defaults here (see gguf_convert.py).
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
CONFIGS = {
    "phi3": lambda: Phi3Config(**BASE, tie_word_embeddings=False),
    "gemma2": lambda: Gemma2Config(**BASE, head_dim=8, sliding_window=6),
    "gemma3": lambda: Gemma3TextConfig(**BASE, head_dim=8, sliding_window=6),
    # transformers reads no head_dim for qwen3 and takes its default, 128 (as every released Qwen3 has).
    "qwen3": lambda: Qwen3Config(**BASE, head_dim=128, tie_word_embeddings=False),
}


def write_gguf(model_dir: str, config, arch: str, out) -> None:
    """An F32 GGUF of the HF checkpoint in ``model_dir`` under llama.cpp's names and metadata keys."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch.startswith("gemma"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(byte_tokens + ["Ġt", "<|endoftext|>"])
    writer.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)
    writer.add_pad_token_id(VOCAB - 1)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    for name, tensor in load_file(f"{model_dir}/model.safetensors").items():
        base, suffix = name.rsplit(".", 1)
        data = tensor.numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp stores Gemma's norm weights with the 1 folded in
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_gguf_family_converts_and_matches_hf(arch, tmp_path):
    config = CONFIGS[arch]()
    path = save_tiny_model(config, tmp_path / "hf", norm_std=0.3)
    write_gguf(path, config, arch, tmp_path / f"tiny-{arch}.gguf")
    folder = convert_gguf(tmp_path / f"tiny-{arch}.gguf", tmp_path / "converted")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(0, VOCAB, (n,), generator=g).tolist(), 6, 0) for n in (5, 17)]
    with LLM(model=str(folder), kv_cache_memory=1 << 22) as llm:
        assert_matches_reference(drive_outputs(llm, items, logprobs=0, ignore_eos=True), hf_reference(hf, items))


def metadata_only_gguf(path, arch: str, expert_count: int | None = None):
    """A GGUF file with an architecture (and perhaps an expert count) but no tensors: enough to be refused."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if expert_count is not None:
        writer.add_expert_count(expert_count)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture_names_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="'falcon' is not supported; supported: gemma2, gemma3, llama") as info:
        convert_gguf(metadata_only_gguf(tmp_path / "m.gguf", "falcon"), tmp_path / "out")
    assert "qwen3moe" in str(info.value) and set(SUPPORTED_GGUF_ARCHITECTURES) >= {"phi3", "qwen2moe", "qwen3"}


def test_keep_quantization_is_refused_outside_the_llama_family(tmp_path):
    with pytest.raises(ValueError, match="keeping GGUF quantization is supported for llama, mistral, qwen2 only"):
        convert_gguf(metadata_only_gguf(tmp_path / "m.gguf", "gemma2"), tmp_path / "out", keep_quantization=True)


def test_mixtral_gguf_is_refused(tmp_path):
    """llama.cpp writes Mixtral as ``llama`` with experts, which transformers' GGUF loader cannot map."""
    with pytest.raises(ValueError, match="Mixtral"):
        convert_gguf(metadata_only_gguf(tmp_path / "m.gguf", "llama", expert_count=8), tmp_path / "out")
