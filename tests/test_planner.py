"""The planner: workloads, SLOs, model sizes, the shared-core model, the roofline plans and their refusals, the
written config, the CLI, and a profile of a tiny model driving a plan on this machine."""

from __future__ import annotations

import json
import os

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer.cluster_config import load_cluster_config
from dist_infer.config import ModelConfig
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.entrypoints.cli import main as cli_main
from dist_infer.planner import PlanError, SLO, plan_model, write_config
from dist_infer.planner.events import EventQueue, SharedHost
from dist_infer.planner.fits import interpolate, linear_fit, table
from dist_infer.planner.metrics import RequestTimes, SimResult
from dist_infer.planner.model_shape import ModelShape
from dist_infer.planner.workload import fixed_batch, load_trace, parse_workload, poisson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_8B = os.path.join(ROOT, "benchmarks", "planner_models", "llama-3-8b")
LLAMA_70B = os.path.join(ROOT, "benchmarks", "planner_models", "llama-3-70b")
H100 = os.path.join(ROOT, "cluster_configs", "h100-1gpu.yaml")
H100X8 = os.path.join(ROOT, "cluster_configs", "h100-8gpu.yaml")


# ---- workloads, SLOs, metrics ---------------------------------------------------------------------------------
def test_workloads_from_their_command_line_forms():
    batch = parse_workload("batch:4:10-20:5", vocab_size=100, seed=3)
    assert len(batch.items) == 4 and all(i.arrival_s == 0 and 10 <= i.prompt_len <= 20 for i in batch.items)
    assert all(i.output_len == 5 and 0 < min(i.prompt_token_ids) and max(i.prompt_token_ids) < 100
               for i in batch.items)
    assert parse_workload("batch:4:10-20:5", vocab_size=100, seed=3) == batch  # seeded
    arrivals = [i.arrival_s for i in poisson(50.0, 2000, 8, 8, seed=1).items]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.1)
    for bad in ("batch:0:8:8", "poisson:-1:4:8:8", "batch:4:8", "nope:1", "batch:4:9-3:2"):
        with pytest.raises(ValueError, match="workload"):
            parse_workload(bad)


def test_trace_files_share_prefixes_and_name_bad_lines(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 0.5, "prompt_len": 40, "output_len": 3, "prefix_len": 32, "prefix_group": "a"}\n'
                    '{"arrival_s": 0.1, "prompt_len": 36, "output_len": 2, "prefix_len": 32, "prefix_group": "a"}\n'
                    '{"arrival_s": 0.2, "prompt_len": 36, "output_len": 2}\n')
    items = load_trace(str(path), vocab_size=500).items
    assert [i.arrival_s for i in items] == [0.1, 0.2, 0.5]  # sorted by arrival
    assert items[0].prompt_token_ids[:32] == items[2].prompt_token_ids[:32]
    assert items[1].prompt_token_ids[:32] != items[0].prompt_token_ids[:32]
    path.write_text('{"arrival_s": 0, "prompt_len": 4, "output_len": 1}\n{"arrival_s": 0, "prompt_len": 4}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:2: missing field 'output_len'"):
        load_trace(str(path))
    csv_path = tmp_path / "trace.csv"
    csv_path.write_text("arrival_s,prompt_len,output_len,colour\n0,4,1,red\n")
    with pytest.raises(ValueError, match=r"trace.csv:2: unknown field 'colour'"):
        load_trace(str(csv_path))


def test_slo_terms_and_goodput():
    slo = SLO.parse("ttft_p99=500ms,tpot_p99=0.05")
    assert slo == SLO(ttft_p99=0.5, tpot_p99=0.05)
    for bad in ("ttft=1", "ttft_p99=fast", "tpot_p99=-1"):
        with pytest.raises(ValueError, match="SLO term"):
            SLO.parse(bad)
    requests = [RequestTimes(0.0, 8, 3, first_token=0.2, finish=0.4, generated=3),  # TPOT 0.1
                RequestTimes(1.0, 8, 3, first_token=1.9, finish=2.0, generated=3)]  # TTFT 0.9
    result = SimResult("x", requests)
    assert result.duration == 2.0 and result.throughput == 3.0
    assert result.mean_tpot == pytest.approx((0.1 + 0.05) / 2)
    assert result.goodput(ttft=0.5) == 0.5 and result.goodput(tpot=0.06) == 0.5 and result.goodput() == 1.0


# ---- sizes, fits and shared cores ------------------------------------------------------------------------------
def test_model_shape_counts_llama_3_8b_and_slices_it():
    shape = ModelShape.from_hf_config(ModelConfig(LLAMA_8B, skip_tokenizer_init=True).hf_config, dtype_bytes=2)
    assert shape.total_params() / 1e9 == pytest.approx(8.03, abs=0.01)  # Meta's figure
    assert shape.layer_params_per_rank(4) * 4 == shape.layer_params_per_rank(1)
    assert shape.kv_heads_per_rank(16) == 1  # more ranks than K/V heads: each keeps one
    assert shape.kv_bytes_per_token(1, 32) == 32 * 2 * 8 * 128 * 2  # 128 KiB per token in bf16


def test_fits_interpolate_and_recover_coefficients():
    curve = table([1, 2, 2, 4], [1.0, 2.0, 4.0, 5.0])
    assert curve == {"x": [1, 2, 4], "y": [1.0, 3.0, 5.0]}
    assert interpolate(curve, 0) == 1.0 and interpolate(curve, 3) == 4.0 and interpolate(curve, 6) == 7.0
    feats = [{"a": 1.0, "b": float(b)} for b in range(1, 9)]
    coef = linear_fit(feats, [0.002 + 0.0005 * f["b"] for f in feats], ["a", "b"])
    assert coef["a"] == pytest.approx(0.002, rel=1e-6) and coef["b"] == pytest.approx(0.0005, rel=1e-6)


def _finish_times(cores, *tasks):
    """Runs (name, work seconds, threads asked for, threads per process, efficiency) tasks from time 0."""
    events = EventQueue()
    host = SharedHost(events, cores)
    done = {}
    for name, work, demand, threads, efficiency in tasks:
        host.run(work, lambda name=name: done.setdefault(name, events.now), demand, threads, efficiency)
    events.run()
    return done


def test_shared_cores_slow_crowded_and_bandwidth_bound_work():
    # Two one-thread tasks on two cores whose cores deliver 80 % when both are busy: 1 s of work takes 1.25 s.
    assert _finish_times(2, ("a", 1.0, 1, 1, 0.8), ("b", 1.0, 1, 1, 0.8)) == pytest.approx({"a": 1.25, "b": 1.25})
    # A two-thread task was profiled with both cores busy: alone it runs at its profiled speed.
    assert _finish_times(2, ("w", 1.0, 2, 2, 0.8))["w"] == pytest.approx(1.0)
    # A three-process group on two cores: 2/3 of the cores, at that occupancy's efficiency.
    assert _finish_times(2, ("g", 1.0, 3, 1, 0.8))["g"] == pytest.approx(1.5 / 0.8)
    # A short task beside a long one: both at half speed until the short one ends, then the long one alone.
    assert _finish_times(1, ("s", 1.0, 1, 1, 1.0), ("l", 3.0, 1, 1, 1.0)) == pytest.approx({"s": 2.0, "l": 4.0})
    assert _finish_times(None, ("a", 1.0, 8, 1, 0.5))["a"] == 1.0  # GPUs: nothing shared


# ---- roofline plans, refusals, written configs, the CLI -----------------------------------------------------------
def test_plan_for_llama_3_8b_on_one_h100_and_its_config(tmp_path):
    result = plan_model(LLAMA_8B, H100, "batch:64:256:64")
    assert "roofline of the H100-SXM datasheet" in result.cost_source
    assert [str(c.layout) for c in result.ranked] == ["tp1 pp1 dp1"]
    row = result.rows()[0]
    # bf16 weights 16 GB; decode reads them once per step: TPOT above the 16e9 / 3.35e12 s = 4.8 ms floor.
    assert row["weights_gb"] == pytest.approx(16.06, abs=0.1) and row["tpot_mean_s"] > 0.0048
    assert row["kv_tokens"] > 64 * 320
    path = write_config(result, tmp_path / "best.yaml", {"nodes": 1, "gpus_per_node": 1, "gpu": "h100-sxm"})
    config = load_cluster_config(str(path))
    assert config.engine["tensor_parallel_size"] == 1 and config.cluster["gpu"] == "h100-sxm"
    built = EngineArgs(**config.engine).create_engine_config()  # what `serve --config` builds first
    assert built.model_config.max_model_len == 8192


def test_plan_ranks_layouts_of_llama_3_70b_on_eight_h100():
    result = plan_model(LLAMA_70B, H100X8, "batch:64:128:32", pp_sizes=[1, 2])
    layouts = [str(c.layout) for c in result.ranked]
    throughputs = [c.summary["throughput_tok_s"] for c in result.ranked]
    assert throughputs == sorted(throughputs, reverse=True)  # a closed batch ranks by throughput
    assert "tp1 pp1 dp1" not in layouts  # 141 GB of bf16 weights do not fit one 80 GB GPU
    assert any("fewer than the" in c.refused for c in result.refused if str(c.layout) == "tp1 pp1 dp1")
    assert all(c.layout.world_size <= 8 for c in result.ranked)


def test_plan_refuses_a_model_larger_than_the_cluster_and_says_what_fits():
    with pytest.raises(PlanError, match=r"weights alone take 141\.\d GB.*int4.*needs about \d+ x H100-SXM"):
        plan_model(LLAMA_70B, H100, "batch:4:128:16")


def test_plan_refuses_an_slo_nothing_meets_and_names_a_rate_that_would():
    with pytest.raises(PlanError, match=r"lowest TTFT p99 is \d+ ms.*meets it at about [\d.]+ requests/s"):
        plan_model(LLAMA_8B, H100, "poisson:40:120:2048:64", slo="ttft_p99=300ms")
    with pytest.raises(PlanError, match="lowest TPOT p99"):
        plan_model(LLAMA_8B, H100, "batch:8:64:8", slo="tpot_p99=1ms")


def test_plan_cli_prints_the_table_and_writes_config_and_json(tmp_path, capsys):
    out = tmp_path / "best.yaml"
    assert cli_main(["plan", "--model", LLAMA_8B, "--cluster", H100, "--workload", "batch:16:128:32",
                     "--write-config", str(out), "--json", str(tmp_path / "plan.json")]) == 0
    printed = capsys.readouterr().out
    assert "tp1 pp1 dp1" in printed and "roofline" in printed and "written to" in printed
    assert load_cluster_config(str(out)).engine["model"] == LLAMA_8B
    assert json.loads((tmp_path / "plan.json").read_text())["layouts"][0]["layout"] == "tp1 pp1 dp1"
    assert cli_main(["plan", "--model", LLAMA_70B, "--cluster", H100, "--workload", "batch:4:64:8"]) == 1
    assert "weights alone take" in capsys.readouterr().err


# ---- this machine: a profile of a tiny model drives a plan -------------------------------------------------------
@pytest.mark.slow
def test_profile_of_a_tiny_model_drives_a_plan_on_this_machine(tmp_path):
    folder = save_tiny_model(tiny_llama_config(num_hidden_layers=4, max_position_embeddings=512),
                             tmp_path / "tiny", tokenizer_dir=None)
    from dist_infer.planner import profile
    from dist_infer.planner.profiler import load_profile

    path = profile(folder, [1, 2], [1], str(tmp_path / "profile.json"), quick=True, log=lambda m: None)
    data = load_profile(path)
    assert set(data["workers"]) == {"tp1-t1", "tp2-t1"} and data["comm"]["ops"]["all_reduce"]["2"]
    dense = data["workers"]["tp1-t1"]["dense"]
    assert dense["x"] == sorted(dense["x"]) and all(y > 0 for y in dense["y"])
    result = plan_model(folder, None, fixed_batch(8, 32, 8, 128), profile=path, max_workers=2,
                        skip_tokenizer_init=True, max_model_len=256)
    assert {str(c.layout) for c in result.ranked} <= {"tp1 pp1 dp1", "tp1 pp1 dp2", "tp1 pp2 dp1", "tp2 pp1 dp1"}
    assert "profile" in result.cost_source and result.best.summary["throughput_tok_s"] > 0
    with pytest.raises(PlanError, match="measured for another model shape"):
        plan_model(LLAMA_8B, None, "batch:2:16:4", profile=path)
