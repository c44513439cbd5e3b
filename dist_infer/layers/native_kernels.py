"""Native CPU kernels, compiled from C on first use with the system's C compiler and loaded with ctypes.

Only where the PyTorch reference path pays for a copy it cannot avoid: paged decode attention gathers every
key and value into a padded tensor before attending; the native kernel reads them once, straight from their
blocks. Without a compiler (or with ``DIST_INFER_NATIVE_KERNELS=0``) the reference path runs instead.

The library is built with ``-march=native`` into the dist-infer cache, keyed by the source, the flags and
the CPU's features, and linked against the OpenMP runtime torch already loaded, so both share one thread
pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from dist_infer.model_loader.cache_dir import cache_root

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "native" / "paged_decode.c"
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
_LIBS = ["-lmvec", "-lm"]


def native_kernels_enabled() -> bool:
    return os.environ.get("DIST_INFER_NATIVE_KERNELS", "1") != "0"


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.lru_cache(maxsize=None)
def _load() -> ctypes.CDLL | None:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS + _LIBS).encode(), compiler.encode(),
                                     platform.machine().encode(), _cpu_features().encode()])).hexdigest()[:16]
    target = cache_root() / "native" / f"paged_decode-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp, *_LIBS], check=True, capture_output=True)
            os.replace(tmp, target)  # atomic: a concurrent build just replaces an identical file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    sizes = [i64] * 6 + [ctypes.c_float, i64, ptr]  # B, Hq, Hk, D, bs, W, scale, window, out
    lib.dist_infer_paged_decode_f32.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, *sizes]
    lib.dist_infer_paged_decode_i8.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, *sizes]
    lib.dist_infer_paged_decode_f32.restype = lib.dist_infer_paged_decode_i8.restype = None
    return lib


def paged_decode_kernel():
    """The native decode kernel, or None when it cannot be built here (the reason is logged once)."""
    if not native_kernels_enabled():
        return None
    try:
        return _load()
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
        logger.warning("native paged attention unavailable, using the PyTorch path: %s", detail)
        _load.cache_clear()
        return None


def paged_decode(lib, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, sliding_window: int | None,
                 kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] fp32 (rows may be strided), caches [NB, bs, Hk, D] fp32 -- or int8 with ``kv_scales``
    [2, NB, Hk] -- -> [B, Hq, D]."""
    B, Hq, D = q.shape
    NB, bs, Hk, _ = k_cache.shape
    assert q.stride(2) == 1 and q.stride(1) == D, "each query row must be contiguous"
    out = torch.empty(B, Hq, D, dtype=q.dtype)
    sizes = (block_tables.data_ptr(), seq_lens.data_ptr(), B, Hq, Hk, D, bs, block_tables.shape[1], scale,
             sliding_window or 0, out.data_ptr())
    if kv_scales is None:
        lib.dist_infer_paged_decode_f32(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), *sizes)
    else:
        lib.dist_infer_paged_decode_i8(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                       kv_scales[0].data_ptr(), kv_scales[1].data_ptr(), *sizes)
    return out
