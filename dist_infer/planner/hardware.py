"""Accelerator datasheets and cluster descriptions: what the planner's roofline model knows of a device it never ran on.

Where a layout was never profiled, the planner estimates a step from the device's datasheet, as a roofline:

    time(step) = max(flops / peak_flops[dtype], bytes_moved / memory_bandwidth)

where ``flops`` is the step's arithmetic (about 2 x parameters x tokens for the matmuls, plus attention) and
``bytes_moved`` what it must read from HBM (the weights once per step, plus the KV cache it attends to). A
collective or a pipeline hand-off over a link of bandwidth ``B`` and latency ``L`` costs ``L + bytes / B`` per hop.

All figures are vendors' datasheet peaks: memory in decimal bytes (a datasheet's "80 GB" is 80e9 bytes, a little
under what the driver reports, so plans err on the safe side), bandwidths in bytes/s, FLOP/s dense (datasheets
quote tensor-core figures "with sparsity", twice the dense rate; the dense ones are used here). Real kernels reach
only part of these peaks; the planner's efficiency factors, fitted from profiles, account for that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

_TERA = 1e12
_GB = 1e9


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator's datasheet: capacity, peak rates, and its link to the other devices of its node."""

    name: str
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    peak_flops: dict[str, float]  # dense FLOP/s per dtype name ("float32" is the non-tensor-core rate)
    intra_node_bandwidth: float  # bytes/s per direction per device (NVLink / Infinity Fabric / PCIe)
    source: str


def _tflops(**rates: float) -> dict[str, float]:
    return {dtype: tflops * _TERA for dtype, tflops in rates.items()}


# Hopper SXM (H100 SXM5, H200 SXM) share one die and clocks: only memory differs.
_HOPPER_SXM = _tflops(float32=66.9, tfloat32=494.7, bfloat16=989.4, float16=989.4, float8=1978.9, int8=1978.9)
_A100 = _tflops(float32=19.5, tfloat32=156, bfloat16=312, float16=312, int8=624)
_NVLINK4 = 450 * _GB  # 900 GB/s total bidirectional per GPU
_NVLINK3 = 300 * _GB  # 600 GB/s total bidirectional per GPU
_PCIE4_X16 = 32 * _GB  # "64 GB/s bidirectional"

DEVICES: dict[str, DeviceSpec] = {
    spec.name.lower(): spec
    for spec in (
        DeviceSpec("H100-SXM", 80 * _GB, 3.35e12, _HOPPER_SXM, _NVLINK4,
                   "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column) and Hopper architecture whitepaper "
                   "(dense rates); https://www.nvidia.com/en-us/data-center/h100/"),
        DeviceSpec("H100-PCIe", 80 * _GB, 2.0e12,
                   _tflops(float32=51.2, tfloat32=378, bfloat16=756, float16=756, float8=1513, int8=1513),
                   300 * _GB,
                   "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column; NVLink bridge 600 GB/s for a pair, "
                   "set intra_node_gbps for bridgeless servers: PCIe Gen5 x16 is 64 GB/s per direction); "
                   "https://www.nvidia.com/en-us/data-center/h100/"),
        DeviceSpec("H200", 141 * _GB, 4.8e12, _HOPPER_SXM, _NVLINK4,
                   "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column); "
                   "https://www.nvidia.com/en-us/data-center/h200/"),
        DeviceSpec("A100-80GB", 80 * _GB, 2.039e12, _A100, _NVLINK3,
                   "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column); "
                   "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                   "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
        DeviceSpec("A100-40GB", 40 * _GB, 1.555e12, _A100, _NVLINK3,
                   "NVIDIA A100 Tensor Core GPU datasheet (A100 40GB SXM column); "
                   "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                   "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
        DeviceSpec("L40S", 48 * _GB, 864 * _GB,
                   _tflops(float32=91.6, tfloat32=183, bfloat16=362.05, float16=362.05, float8=733, int8=733),
                   _PCIE4_X16,
                   "NVIDIA L40S datasheet (no NVLink: PCIe Gen4 x16, 64 GB/s bidirectional); "
                   "https://www.nvidia.com/en-us/data-center/l40s/"),
        DeviceSpec("L4", 24 * _GB, 300 * _GB,
                   _tflops(float32=30.3, tfloat32=60, bfloat16=121, float16=121, float8=242.5, int8=242.5),
                   _PCIE4_X16,
                   "NVIDIA L4 Tensor Core GPU datasheet (no NVLink: PCIe Gen4 x16, 64 GB/s bidirectional); "
                   "https://www.nvidia.com/en-us/data-center/l4/"),
        DeviceSpec("MI300X", 192 * _GB, 5.3e12,
                   _tflops(float32=163.4, tfloat32=653.7, bfloat16=1307.4, float16=1307.4, float8=2614.9,
                           int8=2614.9),
                   448 * _GB,
                   "AMD Instinct MI300X datasheet and ROCm docs 'AMD Instinct MI300 series microarchitecture' "
                   "(7 Infinity Fabric links, 896 GB/s aggregate bidirectional); "
                   "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html"),
    )
}

_ALIASES = {
    "h100": "h100-sxm", "h100-sxm5": "h100-sxm", "h100-80gb": "h100-sxm", "h200-sxm": "h200",
    "a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb", "mi300": "mi300x",
}


def device_spec(name: str) -> DeviceSpec:
    """The datasheet of ``name``: case-insensitive, ``_`` or a space may stand for ``-``, short names such as
    ``h100`` (the SXM part) or ``a100`` (80 GB) accepted."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key not in DEVICES:
        raise ValueError(f"unknown GPU {name!r}: known devices are {', '.join(sorted(DEVICES))} "
                         f"(aliases {', '.join(sorted(_ALIASES))})")
    return DEVICES[key]


# A CPU-only cluster has no datasheet: processes of one node talk over loopback / shared memory (gloo). This order of
# magnitude only ranks layouts; a profile replaces it.
CPU_INTRA_NODE_BANDWIDTH = 10 * _GB
DEFAULT_INTER_NODE_GBPS = 100.0  # one common Ethernet / InfiniBand EDR NIC; set inter_node_gbps for the real fabric
INTRA_NODE_LATENCY_S = 5e-6  # NVLink hop
INTER_NODE_LATENCY_S = 1e-5  # InfiniBand hop


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster as the planner sees it: ``nodes`` x ``devices_per_node`` identical devices (none: CPU-only).

    Bandwidths are bytes/s: ``intra_node_bandwidth`` per device and direction (default: the device's fabric),
    ``inter_node_bandwidth`` per node and direction. Latencies are per hop.
    """

    nodes: int = 1
    devices_per_node: int = 0
    device: DeviceSpec | None = None
    cpus_per_node: int = 0
    inter_node_bandwidth: float = DEFAULT_INTER_NODE_GBPS * _GB / 8
    intra_node_bandwidth: float | None = None
    link_latency_s: float = INTRA_NODE_LATENCY_S
    inter_node_latency_s: float = INTER_NODE_LATENCY_S

    def __post_init__(self) -> None:
        if self.intra_node_bandwidth is None:
            default = self.device.intra_node_bandwidth if self.device else CPU_INTRA_NODE_BANDWIDTH
            object.__setattr__(self, "intra_node_bandwidth", default)

    @property
    def memory_per_device(self) -> int:
        """Bytes of accelerator memory per device (0 on a CPU-only cluster)."""
        return self.device.memory_bytes if self.device else 0

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node


_KEY_KINDS = {"nodes": int, "gpus_per_node": int, "cpus_per_node": int, "gpu": str, "gpu_memory_gb": float,
              "intra_node_gbps": float, "inter_node_gbps": float}


def _is_kind(value, kind: type) -> bool:
    if isinstance(value, bool):  # YAML's yes/no is no number
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def cluster_spec_from_dict(cluster: dict, where: str) -> ClusterSpec:
    """From a cluster config's ``cluster:`` section: ``nodes`` (default 1), ``gpus_per_node`` (default 0: CPU-only),
    ``cpus_per_node``, ``gpu`` (a :data:`DEVICES` name, required with GPUs), ``gpu_memory_gb`` (overrides the
    datasheet's memory, e.g. for a MIG slice), ``intra_node_gbps`` and ``inter_node_gbps`` (gigabits per second, as
    network people write them: 400 Gb/s = 50e9 bytes/s). Bad values are ValueErrors naming ``where`` and the key."""
    if not isinstance(cluster, dict):
        raise ValueError(f"{where}: cluster must be a mapping, got {cluster!r}")
    values = {}
    for key, value in cluster.items():
        kind = _KEY_KINDS.get(key)
        if kind is None:
            raise ValueError(f"{where}: unknown key cluster.{key} (expected one of {', '.join(sorted(_KEY_KINDS))})")
        if not _is_kind(value, kind):
            raise ValueError(f"{where}: cluster.{key} must be {kind.__name__}, got {value!r}")
        values[key] = value
    for key in ("nodes", "gpu_memory_gb", "intra_node_gbps", "inter_node_gbps"):
        if key in values and values[key] <= 0:
            raise ValueError(f"{where}: cluster.{key} must be positive, got {values[key]!r}")
    for key in ("gpus_per_node", "cpus_per_node"):
        if values.get(key, 0) < 0:
            raise ValueError(f"{where}: cluster.{key} must not be negative, got {values[key]!r}")

    gpus = int(values.get("gpus_per_node", 0))
    device = None
    if gpus:
        if "gpu" not in values:
            raise ValueError(f"{where}: cluster.gpu is required with gpus_per_node={gpus}: one of "
                             f"{', '.join(sorted(DEVICES))}")
        try:
            device = device_spec(values["gpu"])
        except ValueError as e:
            raise ValueError(f"{where}: cluster.gpu: {e}") from None
        if "gpu_memory_gb" in values:
            memory = int(values["gpu_memory_gb"] * _GB)
            if memory > device.memory_bytes:
                raise ValueError(f"{where}: cluster.gpu_memory_gb={values['gpu_memory_gb']} exceeds the "
                                 f"{device.name}'s {device.memory_bytes / _GB:g} GB")
            device = dataclasses.replace(device, memory_bytes=memory)
    else:
        for key in ("gpu", "gpu_memory_gb"):
            if key in values:
                raise ValueError(f"{where}: cluster.{key} is set but gpus_per_node is 0 (a CPU-only cluster)")
    intra = values.get("intra_node_gbps")
    return ClusterSpec(
        nodes=int(values.get("nodes", 1)), devices_per_node=gpus, device=device,
        cpus_per_node=int(values.get("cpus_per_node", 0)),
        inter_node_bandwidth=values.get("inter_node_gbps", DEFAULT_INTER_NODE_GBPS) * _GB / 8,
        intra_node_bandwidth=None if intra is None else intra * _GB / 8,
    )
