"""Datasheets and cluster descriptions for the planner: lookups, aliases, the cluster section's new keys and errors."""

from __future__ import annotations

import pytest

from dist_infer.cluster_config import load_cluster_config
from dist_infer.planner.hardware import DEVICES, ClusterSpec, cluster_spec_from_dict, device_spec

DTYPES = {"float32", "tfloat32", "bfloat16", "float16", "float8", "int8"}


def test_h100_sxm_matches_its_datasheet():
    h100 = device_spec("H100-SXM")
    assert h100.memory_bytes == 80e9 and h100.memory_bandwidth == 3.35e12
    assert h100.peak_flops["bfloat16"] == pytest.approx(989.4e12)  # dense: half the 1,979 "with sparsity"
    assert h100.intra_node_bandwidth == 450e9  # 900 GB/s NVLink counts both directions
    pcie = device_spec("h100-pcie")
    assert (pcie.peak_flops["bfloat16"], pcie.memory_bandwidth) == (pytest.approx(756e12), 2.0e12)
    h200 = device_spec("h200")
    assert (h200.memory_bytes, h200.memory_bandwidth) == (141e9, 4.8e12)
    assert h200.peak_flops == h100.peak_flops


@pytest.mark.parametrize("key", sorted(DEVICES))
def test_every_device_is_complete_and_sourced(key):
    spec = DEVICES[key]
    assert key == spec.name.lower() and spec.source
    assert {"float32", "bfloat16", "float16", "int8"} <= set(spec.peak_flops) <= DTYPES
    # tensor cores beat the plain FP32 units; memory moves at < 10 TB/s; the link is slower than HBM
    assert spec.peak_flops["bfloat16"] > spec.peak_flops["float32"] > 1e12
    assert 1e11 < spec.memory_bandwidth < 1e13 and 0 < spec.intra_node_bandwidth < spec.memory_bandwidth
    assert 16e9 <= spec.memory_bytes <= 192e9


@pytest.mark.parametrize("name,key", [("h100", "h100-sxm"), ("H100_SXM5", "h100-sxm"), ("A100", "a100-80gb"),
                                      ("a100 40gb", "a100-40gb"), ("MI300", "mi300x"), ("L40S", "l40s")])
def test_names_are_case_insensitive_with_aliases(name, key):
    assert device_spec(name) is DEVICES[key]


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown GPU 'h900'.*h100-sxm.*mi300x"):
        device_spec("h900")


def test_cluster_defaults():
    cpu = cluster_spec_from_dict({"nodes": 1}, "local.yaml")
    assert (cpu.device, cpu.devices_per_node, cpu.memory_per_device, cpu.num_devices) == (None, 0, 0, 0)
    assert cpu.intra_node_bandwidth > 0
    gpu = cluster_spec_from_dict({"nodes": 2, "gpus_per_node": 8, "gpu": "h100"}, "two.yaml")
    assert gpu.device is DEVICES["h100-sxm"] and gpu.num_devices == 16
    assert gpu.intra_node_bandwidth == 450e9 and gpu.memory_per_device == 80e9
    assert (gpu.link_latency_s, gpu.inter_node_latency_s) == (5e-6, 1e-5)
    assert ClusterSpec(device=DEVICES["l4"]).intra_node_bandwidth == DEVICES["l4"].intra_node_bandwidth


def test_cluster_overrides_in_gigabits():
    spec = cluster_spec_from_dict({"gpus_per_node": 7, "gpu": "A100-80GB", "gpu_memory_gb": 10,
                                   "intra_node_gbps": 800, "inter_node_gbps": 400, "cpus_per_node": 32}, "mig.yaml")
    assert spec.memory_per_device == 10e9 and spec.device.memory_bandwidth == 2.039e12
    assert (spec.intra_node_bandwidth, spec.inter_node_bandwidth, spec.cpus_per_node) == (100e9, 50e9, 32)
    assert DEVICES["a100-80gb"].memory_bytes == 80e9  # the table itself is untouched


@pytest.mark.parametrize("cluster,message", [
    ({"gpus": 8}, "c.yaml: unknown key cluster.gpus"),
    ({"gpus_per_node": 8}, "c.yaml: cluster.gpu is required with gpus_per_node=8: one of .*h100-sxm"),
    ({"gpus_per_node": 8, "gpu": "v100"}, "c.yaml: cluster.gpu: unknown GPU 'v100'"),
    ({"gpus_per_node": 8, "gpu": 100}, "c.yaml: cluster.gpu must be str"),
    ({"gpu": "h100"}, "c.yaml: cluster.gpu is set but gpus_per_node is 0"),
    ({"gpus_per_node": 1, "gpu": "l4", "gpu_memory_gb": 48}, "gpu_memory_gb=48 exceeds the L4's 24 GB"),
    ({"nodes": 0}, "c.yaml: cluster.nodes must be positive"),
    ({"nodes": 1.5}, "c.yaml: cluster.nodes must be int"),
    ({"inter_node_gbps": "fast"}, "c.yaml: cluster.inter_node_gbps must be float"),
    ({"intra_node_gbps": True}, "c.yaml: cluster.intra_node_gbps must be float"),
    ({"inter_node_gbps": -1}, "c.yaml: cluster.inter_node_gbps must be positive"),
    ({"gpus_per_node": -2}, "c.yaml: cluster.gpus_per_node must not be negative"),
])
def test_cluster_errors_name_the_file_and_key(cluster, message):
    with pytest.raises(ValueError, match=message):
        cluster_spec_from_dict(cluster, "c.yaml")


def _write(tmp_path, cluster: str) -> str:
    path = tmp_path / "planned.yaml"
    path.write_text(f"cluster:\n{cluster}engine:\n  tensor_parallel_size: 8\n  pipeline_parallel_size: 2\n")
    return str(path)


def test_cluster_config_accepts_the_planner_keys(tmp_path):
    path = _write(tmp_path, "  nodes: 2\n  gpus_per_node: 8\n  gpu: H100\n  gpu_memory_gb: 80\n"
                            "  intra_node_gbps: 3600\n  inter_node_gbps: 400\n")
    config = load_cluster_config(path)
    assert cluster_spec_from_dict(config.cluster, path).inter_node_bandwidth == 50e9


@pytest.mark.parametrize("cluster,message", [
    ("  nodes: 2\n  gpus_per_node: 8\n  gpu: tpu-v5\n", "planned.yaml: cluster.gpu: unknown GPU 'tpu-v5'"),
    ("  nodes: 2\n  gpus_per_node: 8\n  inter_node_gbps: lots\n",
     "planned.yaml: cluster.inter_node_gbps must be float"),
])
def test_cluster_config_rejects_bad_planner_keys(tmp_path, cluster, message):
    with pytest.raises(ValueError, match=message):
        load_cluster_config(_write(tmp_path, cluster))
