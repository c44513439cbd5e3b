"""The student: a Hugging Face folder (or a copy of the teacher with blocks dropped), checked to speak the
teacher's tokenizer, loaded by transformers for training."""

from __future__ import annotations

import os

import torch


def make_layer_dropped_student(teacher: str, dest: str, drop_layers: float, show_progress: bool) -> dict:
    """``drop_layers``: a block count (an integer >= 1) or a fraction of the teacher's blocks; ``drop_layers``
    (the compression function) checks the count against the model."""
    from transformers import AutoConfig

    from dist_infer.compression.layer_drop import drop_layers as drop, layers_to_drop

    num_layers = AutoConfig.from_pretrained(teacher).num_hidden_layers
    count = int(drop_layers) if drop_layers >= 1 else layers_to_drop(drop_layers, num_layers)
    return drop(teacher, dest, count, show_progress=show_progress)


def check_tokenizers(teacher_tokenizer, student: str, student_vocab_size: int) -> None:
    """The student must read the teacher's token ids: the same vocabulary (when the student has a tokenizer of
    its own) and an embedding large enough for every id."""
    from transformers import AutoTokenizer

    if len(teacher_tokenizer) > student_vocab_size:
        raise ValueError(f"the student's vocab_size={student_vocab_size} is smaller than the teacher's tokenizer "
                         f"({len(teacher_tokenizer)} tokens): the student must use the teacher's tokenizer")
    if not any(name.startswith("tokenizer") for name in os.listdir(student)):
        return
    student_tokenizer = AutoTokenizer.from_pretrained(student)
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(f"the student's tokenizer ({student}) differs from the teacher's: distillation compares "
                         f"distributions token by token, so both must use the same vocabulary")


def load_student(path: str, device: torch.device, freeze_embeddings: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.config.use_cache = False
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        head = model.get_output_embeddings()
        if head is not None:
            head.weight.requires_grad_(False)
    model.train()
    return model


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
