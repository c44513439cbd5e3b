"""Wanda pruning: masks equal a reference that measures input norms with transformers block by block (pruned
blocks feeding the next), and activation-aware scores keep what magnitude would drop."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_model, tiny_llama_config
from dist_infer.compression.pruning import prune_checkpoint
from test_pruning import CALIBRATION, PROJECTIONS

LINEARS = [f"self_attn.{p}" for p in PROJECTIONS[:4]] + [f"mlp.{p}" for p in PROJECTIONS[4:]]


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_llama_with_tokenizer):
    config = tiny_llama_config(vocab_size=49152, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                               intermediate_size=64, num_hidden_layers=3)
    return save_tiny_model(config, tmp_path_factory.mktemp("wanda_src"), tokenizer_dir=tiny_llama_with_tokenizer,
                           norm_std=0.5)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(str(folder), "model.safetensors"))


def _reference_keep(scores: torch.Tensor, method: str, sparsity: float) -> torch.Tensor:
    if method == "2:4":
        groups = scores.reshape(scores.shape[0], -1, 4)
        ranks = groups.argsort(-1, descending=True).argsort(-1)  # rank of each score within its group of 4
        return (ranks < 2).reshape(scores.shape)
    order = scores.argsort(1)  # per output row, ascending
    drop = torch.zeros(scores.shape, dtype=torch.bool)
    drop.scatter_(1, order[:, :round(sparsity * scores.shape[1])], True)
    return ~drop


@pytest.mark.parametrize("method,sparsity", [("unstructured", 0.4), ("2:4", 0.5)])
def test_masks_equal_layer_by_layer_reference(src, tmp_path, method, sparsity):
    summary = prune_checkpoint(src, str(tmp_path / "out"), method, sparsity=sparsity, calibration_texts=CALIBRATION,
                               show_progress=False)
    # round(sparsity * in) per row: 19 of 48 and 26 of 64 inputs at 40 %
    assert summary["score"] == "wanda" and summary["achieved_sparsity"] == pytest.approx(sparsity, abs=0.01)
    before, after = _weights(src), _weights(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(src)
    texts = [torch.tensor([tokenizer(t)["input_ids"]]) for t in CALIBRATION]
    # Block i is measured with blocks < i already pruned: load the pruned weights one block at a time.
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for i, layer in enumerate(model.model.layers):
        squares = {}
        hooks = [layer.get_submodule(key).register_forward_pre_hook(
            lambda m, args, key=key: squares.__setitem__(key, squares.get(key, 0) + (args[0][0].double() ** 2).sum(0)))
            for key in LINEARS]
        with torch.no_grad():
            for ids in texts:
                model(ids)
        for hook in hooks:
            hook.remove()
        for key in LINEARS:
            name = f"model.layers.{i}.{key}.weight"
            keep = _reference_keep(before[name].abs() * squares[key].sqrt(), method, sparsity)
            assert torch.equal(after[name] != 0, keep), name
            torch.testing.assert_close(after[name][keep], before[name][keep], rtol=0, atol=0)
            layer.get_submodule(key).weight.data.copy_(after[name])


def test_wanda_keeps_loud_channels_that_magnitude_drops(src, tmp_path):
    """Input channels 0, 5, 9 of block 0's attention are made 1000x louder (norm weight) and their q/k/v weights
    tiny (0.01): magnitude must drop all of them, Wanda (0.01 x 1000 beats every other score) must keep all."""
    weights, loud = _weights(src), [0, 5, 9]
    weights["model.layers.0.input_layernorm.weight"][loud] *= 1000
    for p in ("q_proj", "k_proj", "v_proj"):
        weights[f"model.layers.0.self_attn.{p}.weight"][:, loud] = 0.01
    built = tmp_path / "src"
    built.mkdir()
    for name in os.listdir(src):
        if name != "model.safetensors":
            os.link(os.path.join(src, name), built / name)
    save_file(weights, str(built / "model.safetensors"), metadata={"format": "pt"})
    for score in ("magnitude", "wanda"):
        prune_checkpoint(str(built), str(tmp_path / score), "unstructured", sparsity=0.5,
                         calibration_texts=CALIBRATION, show_progress=False, score=score)
    for p in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{p}.weight"
        assert not _weights(tmp_path / "magnitude")[name][:, loud].any(), name
        assert _weights(tmp_path / "wanda")[name][:, loud].all(), name
