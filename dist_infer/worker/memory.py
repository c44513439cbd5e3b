"""How much memory the KV cache may take on this worker's device."""

from __future__ import annotations

import os

import torch

from dist_infer.config import CacheConfig


def _proc_kib(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_host_memory() -> int:
    """Bytes of RAM the OS could hand out now (MemAvailable), falling back to free pages."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def anon_rss_bytes() -> int:
    """Private (anonymous) memory this process holds now; file pages mapped from checkpoints are not counted,
    as they are shared page cache the kernel can drop."""
    return _proc_kib("/proc/self/status", "RssAnon") or 0


class PeakMemory:
    """Highest private memory seen at the moments ``sample()`` is called (during loading: after every
    tensor and every repacked layer, where the transient peaks are)."""

    def __init__(self):
        self.start = self.peak = anon_rss_bytes()

    def sample(self) -> None:
        self.peak = max(self.peak, anon_rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def kv_cache_budget(cache_config: CacheConfig, device: torch.device, workers_on_host: int = 1) -> int:
    """Bytes for this worker's KV cache: ``kv_cache_memory`` if set; on CUDA ``gpu_memory_utilization`` of the
    card minus what is in use (weights included); on the CPU ``cpu_kv_cache_fraction`` of the RAM available
    now, split evenly among the ``workers_on_host`` workers that draw on the same RAM:
    ``available * fraction / workers_on_host``, so the host as a whole gives ``fraction`` of its memory to KV
    caches however many workers it runs (every worker measures before any of them allocates)."""
    if workers_on_host < 1:
        raise ValueError(f"workers_on_host must be >= 1, got {workers_on_host!r}")
    if cache_config.kv_cache_memory is not None:
        return cache_config.kv_cache_memory
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total * cache_config.gpu_memory_utilization) - (total - free)
    return int(available_host_memory() * cache_config.cpu_kv_cache_fraction / workers_on_host)
