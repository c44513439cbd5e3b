"""A model built as pipeline stages (layer ranges) computes what the whole model computes."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_model, tiny_llama_config
from dist_infer.config import ModelConfig
from dist_infer.model_loader.model_factory import build_model
from model_forward import forward_logits


@pytest.mark.parametrize("tied", [True, False])
def test_stages_chained_equal_the_whole_model(tmp_path, tied):
    path = save_tiny_model(tiny_llama_config(num_hidden_layers=5, tie_word_embeddings=tied), tmp_path / "m")
    config = ModelConfig(path, skip_tokenizer_init=True)
    cpu = torch.device("cpu")
    whole = build_model(config, cpu)
    stages = [build_model(config, cpu, layer_range=(0, 2), is_first=True, is_last=False),
              build_model(config, cpu, layer_range=(2, 3), is_first=False, is_last=False),
              build_model(config, cpu, layer_range=(3, 5), is_first=False, is_last=True)]
    assert stages[0].lm_head is None and stages[1].model.embed_tokens is None and stages[2].model.norm is not None
    # Each stage holds only its own layers' weights (plus embedding / head at the ends).
    names = [{n.split(".")[2] for n, _ in s.named_parameters() if n.startswith("model.layers.")} for s in stages]
    assert names == [{"0", "1"}, {"2"}, {"3", "4"}]
    prompt = list(range(3, 40))
    torch.testing.assert_close(forward_logits(stages, prompt), forward_logits(whole, prompt), atol=1e-5, rtol=0)
