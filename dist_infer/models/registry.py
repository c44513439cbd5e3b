"""Maps a checkpoint's ``architectures`` entry to our model class."""

from __future__ import annotations

from dist_infer.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
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
