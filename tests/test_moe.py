"""Qwen3 and the mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) keep parity with Hugging Face, with
experts tensor-sliced or spread whole over the ranks (expert parallel); the FusedMoE layer against a per-token
reference, on one rank and across data-parallel ranks with different token counts.

End to end: greedy tokens equal and logprobs within 1e-4 of HF's, with chunked prefill (steps of 64 tokens)
and prefix caching on, at tp=1 in-process, tp=2, pp=2 and expert parallel tp=2 under mp, tp=2 x pp=2 and
expert parallel tp=2 under Ray. The mp runs at tp=2 also check each worker's share of the expert weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, Qwen2MoeConfig

from conftest import save_tiny_model
from dist_infer import LLM
from dist_infer.distributed import parallel_state
from dist_infer.distributed.parallel_state import ParallelGroup
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.layers.fused_moe import FusedMoE
from moe_configs import COMMON, FAMILIES
from parallel_helpers import assert_matches_reference, drive_outputs, save_with_reference, workload


LAYOUTS = {
    "tp1": {},
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
    "tp2pp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    "ep-tp2": dict(tensor_parallel_size=2, enable_expert_parallel=True),
}
# Each family at least once per executor; expert parallel on both, and for the shared-expert family.
MOE = [f for f in FAMILIES if f != "qwen3"]
MP_CASES = [(f, lay) for f in FAMILIES for lay in ("tp2", "pp2")] + [(f, "ep-tp2") for f in MOE]
# Under Ray a tensor x pipeline launch covers both kinds of split, for every family, and each MoE family also
# runs expert parallel.
RAY_CASES = [(f, "tp2pp2") for f in FAMILIES] + [(f, "ep-tp2") for f in MOE]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (path, config, HF greedy (tokens, logprobs) per workload request)."""
    root, built = tmp_path_factory.mktemp("moe"), {}
    for name, (make, bias_std) in FAMILIES.items():
        config = make()
        path, _, _, reference = save_with_reference(config, root / name, bias_std=bias_std)
        built[name] = path, config, reference
    return built


def _expert_bytes(config) -> int:
    """fp32 bytes of every expert's gate, up and down projections over the model's sparse layers."""
    from dist_infer.models.moe_config import is_sparse_layer, moe_sizes

    sizes = moe_sizes(config)
    sparse = sum(is_sparse_layer(config, i) for i in range(config.num_hidden_layers))
    return sparse * sizes.num_experts * 3 * sizes.intermediate_size * config.hidden_size * 4


def _check(checkpoints, family, layout, backend=None) -> list[dict] | None:
    """Runs the workload; asserts parity with HF; returns the workers' memory reports (mp and ray)."""
    path, config, reference = checkpoints[family]
    kwargs = dict(LAYOUTS[layout], **({"distributed_executor_backend": backend} if backend else {}))
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, max_num_batched_tokens=64,
             **kwargs) as llm:
        completions = drive_outputs(llm, workload(config.vocab_size), logprobs=2)
        stats = llm.engine.get_stats()
        reports = llm.engine.executor.collective_rpc("memory_report") if backend else None
    assert stats.prefix_cache_hits > 0
    assert_matches_reference(completions, reference)
    return reports


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_in_process_matches_hf(checkpoints, family):
    _check(checkpoints, family, "tp1")


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", MP_CASES)
def test_mp_matches_hf(checkpoints, family, layout):
    reports = _check(checkpoints, family, layout, "mp")
    if layout == "pp2" or family == "qwen3":
        return
    config = checkpoints[family][1]
    experts = [r["local_experts"] for r in reports]
    for report in reports:  # half the expert weights each, whether each expert is sliced or kept whole
        assert report["expert_bytes"] == _expert_bytes(config) // 2, report
    if layout == "ep-tp2":  # different whole experts on each rank, all of them between the two
        assert experts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    else:
        assert experts == [list(range(8))] * 2


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", RAY_CASES)
def test_ray_matches_hf(checkpoints, ray_session, family, layout):
    _check(checkpoints, family, layout, "ray")


# The layer on its own.

def _naive_moe(x, logits, gate_up, down, top_k, renormalize):
    """Token by token, expert by expert: the definition."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(logits[t].float(), -1)
        weights, ids = torch.topk(probs, top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += w * (down[e] @ (F.silu(gate) * up))
    return out


def _random_experts(num_experts=8, hidden=12, inter=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g)
    down = torch.randn(num_experts, hidden, inter, generator=g)
    return gate_up, down


def _load(layer: FusedMoE, gate_up, down) -> None:
    inter = down.shape[2]
    for e in range(gate_up.shape[0]):
        layer.weight_loader(layer.gate_up_proj, gate_up[e, :inter], (e, "gate"))
        layer.weight_loader(layer.gate_up_proj, gate_up[e, inter:], (e, "up"))
        layer.weight_loader(layer.down_proj, down[e], (e, "down"))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens", [0, 1, 9])
def test_fused_moe_matches_per_token_reference(renormalize, tokens):
    gate_up, down = _random_experts()
    layer = FusedMoE(8, 3, 12, 6, renormalize, torch.float32)
    _load(layer, gate_up, down)
    g = torch.Generator().manual_seed(1)
    x, logits = torch.randn(tokens, 12, generator=g), torch.randn(tokens, 8, generator=g)
    out = layer(x, logits)
    assert out.shape == (tokens, 12)
    torch.testing.assert_close(out, _naive_moe(x, logits, gate_up, down, 3, renormalize), atol=1e-5, rtol=1e-5)


class _LazySlice:
    """A safetensors-like lazy tensor that records which rows/columns were read."""

    def __init__(self, tensor):
        self.tensor, self.reads = tensor, []

    def get_shape(self):
        return list(self.tensor.shape)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.tensor[index]


def _fake_group(monkeypatch, name, size, rank):
    monkeypatch.setitem(parallel_state._GROUPS, name, ParallelGroup(name, list(range(size)), rank))


def test_ranks_read_only_their_experts_or_slices(monkeypatch):
    gate_up, down = _random_experts()
    _fake_group(monkeypatch, "tp", 2, 1)
    _fake_group(monkeypatch, "ep", 2, 1)
    whole = FusedMoE(8, 2, 12, 6, True, torch.float32, enable_expert_parallel=True)
    sliced = FusedMoE(8, 2, 12, 6, True, torch.float32, enable_expert_parallel=False)
    assert whole.expert_ids == [4, 5, 6, 7] and tuple(whole.gate_up_proj.shape) == (4, 12, 12)
    assert sliced.expert_ids == list(range(8)) and tuple(sliced.down_proj.shape) == (8, 12, 3)
    for expert in (2, 5):
        source = _LazySlice(down[expert])
        whole.weight_loader(whole.down_proj, source, (expert, "down"))
        assert bool(source.reads) == (expert == 5)  # another rank's expert is never read
    torch.testing.assert_close(whole.down_proj.data[1], down[5])
    source = _LazySlice(gate_up[3, 6:])
    sliced.weight_loader(sliced.gate_up_proj, source, (3, "up"))
    assert source.reads == [(slice(3, 6), slice(None))]  # tp rank 1 reads its half of the up rows only
    torch.testing.assert_close(sliced.gate_up_proj.data[3, 3:], gate_up[3, 9:])


def test_uneven_experts_and_slices_are_value_errors(monkeypatch, tmp_path):
    _fake_group(monkeypatch, "ep", 3, 0)
    with pytest.raises(ValueError, match=r"num_experts=8 cannot be split evenly over 3 .*valid .*: 1, 2, 4, 8"):
        FusedMoE(8, 2, 12, 6, True, torch.float32, enable_expert_parallel=True)
    _fake_group(monkeypatch, "tp", 4, 0)
    with pytest.raises(ValueError, match=r"intermediate size 6 is not divisible by tensor_parallel_size=4"):
        FusedMoE(8, 2, 12, 6, True, torch.float32, enable_expert_parallel=False)
    monkeypatch.undo()
    # The engine config says the same before any worker starts, naming the sizes this model allows.
    mixtral = save_tiny_model(MixtralConfig(vocab_size=64, num_local_experts=6, num_experts_per_tok=2,
                                            intermediate_size=16, **dict(COMMON, num_hidden_layers=1)),
                              tmp_path / "mixtral6")
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the expert-parallel size 4 .*"
                                         r"valid tensor_parallel_size values with enable_expert_parallel: 1, 2$"):
        EngineArgs(model=mixtral, skip_tokenizer_init=True, tensor_parallel_size=4,
                   enable_expert_parallel=True).create_engine_config()
    qwen = save_tiny_model(Qwen2MoeConfig(vocab_size=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=10,
                                          shared_expert_intermediate_size=8, intermediate_size=40,
                                          **dict(COMMON, num_hidden_layers=1)), tmp_path / "qwen2moe")
    with pytest.raises(ValueError, match=r"moe_intermediate_size=10 is not divisible by tensor_parallel_size=4 .*"
                                         r"valid sizes: 1, 2; or enable_expert_parallel"):
        EngineArgs(model=qwen, skip_tokenizer_init=True, tensor_parallel_size=4).create_engine_config()
    config = EngineArgs(model=qwen, skip_tokenizer_init=True, tensor_parallel_size=4, enable_expert_parallel=True,
                        distributed_executor_backend="torchrun", data_parallel_size=2).create_engine_config()
    assert config.parallel_config.expert_parallel_size == 8
    with pytest.raises(ValueError, match="enable_expert_parallel must be True or False"):
        EngineArgs(model=qwen, skip_tokenizer_init=True, enable_expert_parallel="yes").create_engine_config()


def test_enable_expert_parallel_flag():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args(["--enable-expert-parallel"])).enable_expert_parallel is True
    assert EngineArgs.from_cli_args(parser.parse_args([])).enable_expert_parallel is False


def _dp_worker(rank: int, port: int, token_counts: list[list[int]], results) -> None:
    """One of two data-parallel ranks in one world: experts spread over both, each with its own tokens."""
    from dist_infer.distributed.layout import RankLayout
    from dist_infer.distributed.parallel_state import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed(RankLayout(tp=1, pp=1, dp=2), rank, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 30)
    try:
        gate_up, down = _random_experts()
        layer = FusedMoE(8, 2, 12, 6, False, torch.float32, enable_expert_parallel=True)
        _load(layer, gate_up, down)
        errors = []
        for step, counts in enumerate(token_counts):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, logits = torch.randn(counts[rank], 12, generator=g), torch.randn(counts[rank], 8, generator=g)
            out = layer(x, logits)
            expected = _naive_moe(x, logits, gate_up, down, 2, False)
            errors.append((tuple(out.shape) == tuple(x.shape), (out - expected).abs().max().item() if x.numel() else 0))
        results[rank] = (layer.expert_ids, errors, parallel_state.collective_bytes()["dp"])
    finally:
        destroy_distributed()


def test_expert_parallel_across_data_parallel_ranks_with_uneven_tokens():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Rank 0 has rows in one step more than rank 1: a rank that skipped the collectives when it had no rows
    # would leave the other waiting (the group's timeout fails the test).
    token_counts = [[5, 0], [0, 3], [4, 7], [0, 0], [2, 0]]
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_dp_worker, args=(port, token_counts, results), nprocs=2, start_method="spawn")
    assert [results[r][0] for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for rank in range(2):
        for same_shape, error in results[rank][1]:
            assert same_shape and error < 1e-5
        assert results[rank][2] > 0  # the tokens did travel over the dp group
