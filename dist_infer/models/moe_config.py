"""A checkpoint config's mixture-of-experts facts, read the same way for every family (plain Python: the
engine config checks them before any worker starts).

Mixtral names its expert size ``intermediate_size``, has every layer sparse and always renormalizes the top-k
weights; Qwen2-MoE and Qwen3-MoE name it ``moe_intermediate_size``, renormalize when ``norm_topk_prob``, and
make layer ``i`` sparse unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` (those
layers keep a dense MLP of ``intermediate_size``). Qwen2-MoE adds a shared expert of
``shared_expert_intermediate_size``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeSizes:
    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    intermediate_field: str  # the config field it comes from, for error messages
    renormalize: bool  # divide the top-k weights by their sum
    shared_intermediate_size: int = 0  # 0: no shared expert


def moe_sizes(hf_config) -> MoeSizes | None:
    """The config's experts, or None for a dense model."""
    # Checked first: configs alias num_experts and num_local_experts to each other, but only Qwen's have this.
    if getattr(hf_config, "moe_intermediate_size", None) and getattr(hf_config, "num_experts", None):
        return MoeSizes(hf_config.num_experts, hf_config.num_experts_per_tok, hf_config.moe_intermediate_size,
                        "moe_intermediate_size", bool(getattr(hf_config, "norm_topk_prob", False)),
                        getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
    if getattr(hf_config, "num_local_experts", None):
        return MoeSizes(hf_config.num_local_experts, hf_config.num_experts_per_tok, hf_config.intermediate_size,
                        "intermediate_size", True)
    return None


def is_sparse_layer(hf_config, layer_idx: int) -> bool:
    if moe_sizes(hf_config) is None:
        return False
    step = getattr(hf_config, "decoder_sparse_step", None) or 1
    return layer_idx not in (getattr(hf_config, "mlp_only_layers", None) or []) and (layer_idx + 1) % step == 0


def has_dense_mlp(hf_config) -> bool:
    """Whether any layer keeps a dense MLP of ``intermediate_size``."""
    return not all(is_sparse_layer(hf_config, i) for i in range(hf_config.num_hidden_layers))


def check_expert_layout(hf_config, tp: int, ep_size: int, enable_expert_parallel: bool,
                        valid_tp: list[int]) -> None:
    """Raises a ValueError when the experts do not split over the ranks: whole experts over ``ep_size`` ranks
    (``ep_size = tp * dp sharing a world``) with expert parallelism, else each expert's intermediate features
    over the ``tp`` ranks. ``valid_tp``: the tensor-parallel sizes the rest of the model allows."""
    sizes = moe_sizes(hf_config)
    if sizes is None:
        if enable_expert_parallel:
            raise ValueError("enable_expert_parallel needs a mixture-of-experts model; this checkpoint has no experts")
        return
    # Sliced over the tp ranks: the shared expert always, the routed experts unless expert parallel.
    sliced = [("shared_expert_intermediate_size", sizes.shared_intermediate_size)]
    if not sizes.shared_intermediate_size:
        sliced = []
    if enable_expert_parallel:
        per_tp = ep_size // tp
        if sizes.num_experts % ep_size:
            valid = [t for t in valid_tp if sizes.num_experts % (t * per_tp) == 0]
            spread = f"tensor_parallel_size={tp}" + (f" x {per_tp} data-parallel ranks" if per_tp > 1 else "")
            shown = ", ".join(map(str, valid)) or "none"
            raise ValueError(
                f"num_experts={sizes.num_experts} is not divisible by the expert-parallel size {ep_size} ({spread}); "
                f"valid tensor_parallel_size values with enable_expert_parallel: {shown}")
    else:
        sliced = [(sizes.intermediate_field, sizes.intermediate_size)] + sliced
    for name, size in sliced:
        if size % tp:
            valid = [t for t in valid_tp if size % t == 0]
            hint = "" if enable_expert_parallel or name.startswith("shared") else \
                "; or enable_expert_parallel to keep each expert whole"
            raise ValueError(
                f"{name}={size} is not divisible by tensor_parallel_size={tp} (it is sliced over the tensor-parallel "
                f"ranks); valid sizes: {', '.join(map(str, valid)) or 'none'}{hint}")
