"""Layer dropping by Block Influence: BI equals a reference from transformers' hidden states, the lowest-BI blocks
(never the last) go, and the renumbered checkpoint loads and matches transformers token for token."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_model, tiny_llama_config
from dist_infer.compression.layer_drop import drop_layers, layers_to_drop
from test_pruning import CALIBRATION, _assert_greedy_parity

IDENTITY_BLOCKS = (1, 4)  # o_proj and down_proj zeroed: the block returns its input, BI = 0


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_llama_with_tokenizer):
    config = tiny_llama_config(vocab_size=49152, hidden_size=32, num_hidden_layers=5)
    path = save_tiny_model(config, tmp_path_factory.mktemp("drop_src"), tokenizer_dir=tiny_llama_with_tokenizer,
                           norm_std=0.5)
    weights = load_file(os.path.join(path, "model.safetensors"))
    for i in IDENTITY_BLOCKS:
        weights[f"model.layers.{i}.self_attn.o_proj.weight"].zero_()
        weights[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def _reference_influence(path) -> list[float]:
    """``1 - mean cos(h_i, h_{i+1})`` over every calibration token; transformers' last hidden state is after the
    final norm, so the last block's output is taken from a hook instead."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    last = []
    model.model.layers[-1].register_forward_hook(lambda m, args, out: last.append(out))
    cosines = []
    with torch.no_grad():
        for text in CALIBRATION:
            hidden = list(model(torch.tensor([tokenizer(text)["input_ids"]]), output_hidden_states=True).hidden_states)
            hidden[-1] = last.pop()
            cosines.append(torch.stack([torch.cosine_similarity(hidden[i][0].double(), hidden[i + 1][0].double(), -1)
                                        for i in range(len(hidden) - 1)]))
    return (1 - torch.cat(cosines, dim=1).mean(1)).tolist()


def test_drops_lowest_influence_never_the_last_and_matches_transformers(src, tmp_path):
    dest = str(tmp_path / "out")
    summary = drop_layers(src, dest, 2, calibration_texts=CALIBRATION, show_progress=False)
    reference = _reference_influence(src)
    assert summary["block_influence"] == pytest.approx(reference, abs=1e-9)
    assert summary["block_influence"][1] == pytest.approx(0, abs=1e-12)
    # block 4 (the last) is an identity too, yet stays; the next lowest BI among 0, 2, 3 goes
    second = min((0, 2, 3), key=lambda i: reference[i])
    assert summary["dropped"] == sorted([1, second])
    assert (summary["num_layers_before"], summary["num_layers_after"]) == (5, 3)
    kept = [i for i in range(5) if i not in summary["dropped"]]
    with open(os.path.join(dest, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["num_hidden_layers"] == 3
    before = load_file(os.path.join(src, "model.safetensors"))
    after = load_file(os.path.join(dest, "model.safetensors"))
    renamed = {name.replace(f"layers.{old}.", f"layers.{new}."): w for name, w in before.items()
               for new, old in enumerate(kept) if f"layers.{old}." in name}
    renamed.update({name: w for name, w in before.items() if ".layers." not in name})
    assert after.keys() == renamed.keys()
    for name, w in after.items():
        torch.testing.assert_close(w, renamed[name], rtol=0, atol=0)
    assert os.path.isfile(os.path.join(dest, "tokenizer.json"))
    _assert_greedy_parity(dest, [[7, 8, 9], list(range(1000, 1029))])


def test_invalid_requests_raise(src, tmp_path):
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match=r"num_layers must be an integer from 1 to 4"):
            drop_layers(src, str(tmp_path / "out"), bad, calibration_texts=CALIBRATION, show_progress=False)
    assert layers_to_drop(0.25, 30) == 8 and layers_to_drop(0.99, 4) == 3 and layers_to_drop(0.0, 4) == 0
    with pytest.raises(ValueError, match=r"fraction of layers to drop must be in \[0, 1\)"):
        layers_to_drop(1.0, 4)
