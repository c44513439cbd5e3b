"""Maps a checkpoint's ``architectures`` entry to our model class."""

from __future__ import annotations

from dist_infer.models.gemma2 import Gemma2ForCausalLM
from dist_infer.models.gemma3 import Gemma3ForCausalLM
from dist_infer.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from dist_infer.models.mixtral import MixtralForCausalLM
from dist_infer.models.phi3 import Phi3ForCausalLM
from dist_infer.models.qwen2_moe import Qwen2MoeForCausalLM
from dist_infer.models.qwen3 import Qwen3ForCausalLM
from dist_infer.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def check_architecture(hf_config) -> str:
    """The first of the checkpoint's architectures we implement; a ValueError naming the supported ones otherwise."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in MODEL_REGISTRY:
            return name
    shown = ", ".join(names) if names else "none listed in config.json"
    raise ValueError(
        f"unsupported model architecture ({shown}); supported: {', '.join(supported_architectures())}"
    )


def get_model_class(hf_config):
    return MODEL_REGISTRY[check_architecture(hf_config)]
