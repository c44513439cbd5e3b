"""Native CPU kernels, compiled from C on first use with the system's C compiler and loaded with ctypes.

Only where the PyTorch reference path pays for what it cannot avoid:
* paged decode attention (``native/paged_decode.c``) gathers every key and value into a padded tensor before
  attending; the native kernel reads them once, straight from their blocks;
* weight-only quantized matmuls (``native/quant_matmul.c``): PyTorch's fused int4/int8 kernels run slower than
  an fp32 GEMV at small batches on AVX2; the native ones multiply int8-quantized activations with the codes in
  integer SIMD instructions (see ``quantization/native.py``);
* the residual add and RMSNorm (``native/rms_norm.c``): two PyTorch ops with a fixed cost of tens of
  microseconds each, twice per layer per step, for a few hundred nanoseconds of work at decode sizes; likewise
  SwiGLU's SiLU * up (``native/silu_mul.c``);
* a quantized Llama layer's whole decode step (``native/decoder_layer.c``, from the three above), in two calls
  instead of a dozen ops (see ``native_decoder.py``).

Without a compiler (or with ``DIST_INFER_NATIVE_KERNELS=0``) the reference path runs instead; a
compiler that fails on a source is a defect, not a missing tool: it is warned about (once per process and
source, with the compiler's message) before the reference path takes over, and ``build_*`` raises it.

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
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from dist_infer.model_loader.cache_dir import cache_root

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "native" / "paged_decode.c"
_QUANT_SOURCE = Path(__file__).parent / "native" / "quant_matmul.c"
_NORM_SOURCE = Path(__file__).parent / "native" / "rms_norm.c"
_SILU_SOURCE = Path(__file__).parent / "native" / "silu_mul.c"
_DECODER_SOURCE = Path(__file__).parent / "native" / "decoder_layer.c"
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


def native_compiler() -> str:
    """The C compiler the build runs: ``$CC``, else ``cc``."""
    return os.environ.get("CC", "cc")


def native_compiler_available() -> bool:
    return shutil.which(native_compiler()) is not None


@functools.lru_cache(maxsize=None)
def _load(source_path: Path, compiler: str) -> ctypes.CDLL:
    # a source may #include its siblings: all of them key the build
    source = b"".join(p.read_bytes() for p in sorted(source_path.parent.glob("*.[ch]")) if p != source_path)
    source = source_path.read_bytes() + source
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS + _LIBS).encode(), compiler.encode(),
                                     platform.machine().encode(), _cpu_features().encode()])).hexdigest()[:16]
    target = cache_root() / "native" / f"{source_path.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, str(source_path), "-o", tmp, *_LIBS], check=True, capture_output=True)
            os.replace(tmp, target)  # atomic: a concurrent build just replaces an identical file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def _declare_paged_decode(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    sizes = [i64] * 6 + [ctypes.c_float, i64, ptr]  # B, Hq, Hk, D, bs, W, scale, window, out
    lib.dist_infer_paged_decode_f32.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, *sizes]
    lib.dist_infer_paged_decode_i8.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, *sizes]
    lib.dist_infer_paged_decode_f32.restype = lib.dist_infer_paged_decode_i8.restype = None


def _declare_quant_matmul(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    # x, M, K, codes, scales, N, [group,] threads, y
    lib.dist_infer_q4_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr]
    lib.dist_infer_q8_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr]
    lib.dist_infer_q4_matmul.restype = lib.dist_infer_q8_matmul.restype = ctypes.c_int


def _declare_rms_norm(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    # x, residual, weight, T, H, eps, threads, residual out, y
    lib.dist_infer_add_rms_norm_f32.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, i64, ptr, ptr]
    lib.dist_infer_add_rms_norm_f32.restype = None


def _declare_silu_mul(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dist_infer_silu_mul_f32.argtypes = [ptr, i64, i64, i64, ptr]  # gu, T, I, threads, out
    lib.dist_infer_silu_mul_f32.restype = None


def _declare_decoder_layer(lib: ctypes.CDLL) -> None:
    ptr = ctypes.c_void_p
    # layer struct, step struct, input, residual, residual out, output
    for fn in (lib.dist_infer_decoder_attn, lib.dist_infer_decoder_mlp):
        fn.argtypes = [ptr] * 6
        fn.restype = ctypes.c_int


class NativeBuildError(RuntimeError):
    """The C compiler exists but could not build (or the result could not be loaded)."""


# (compiler, source) pairs that failed: each is warned about and tried once per process
_failures: set[tuple[str, Path]] = set()


def _build(source: Path, declare) -> ctypes.CDLL:
    """Builds (or loads from the cache) a native library; raises ``FileNotFoundError`` when the compiler is not
    installed and ``NativeBuildError`` when it is but the build or the load fails."""
    compiler = native_compiler()
    if not native_compiler_available():
        raise FileNotFoundError(f"C compiler {compiler!r} not found (set $CC to another)")
    try:
        lib = _load(source, compiler)
        declare(lib)
        return lib
    except subprocess.CalledProcessError as e:
        raise NativeBuildError(f"{compiler} failed to build {source.name}: "
                               f"{e.stderr.decode(errors='replace')[-2000:]}") from e
    except (OSError, AttributeError) as e:  # a library that does not load or lacks a kernel symbol
        raise NativeBuildError(f"native kernel {source.name} built by {compiler} does not load: {e}") from e


def _kernel_or_none(source: Path, declare, what: str):
    """The library, or None when disabled, when there is no compiler, or when the build fails; the PyTorch path
    runs instead, after a warning (once per process and source) that says why."""
    if not native_kernels_enabled():
        return None
    key = (native_compiler(), source)
    if key in _failures:
        return None
    try:
        return _build(source, declare)
    except (FileNotFoundError, NativeBuildError) as e:
        _failures.add(key)
        logger.warning("native %s unavailable, using the PyTorch path: %s", what, e)
        return None


def build_paged_decode(source: Path | None = None) -> ctypes.CDLL:
    return _build(source or _SOURCE, _declare_paged_decode)


def build_quant_matmul(source: Path | None = None) -> ctypes.CDLL:
    return _build(source or _QUANT_SOURCE, _declare_quant_matmul)


def paged_decode_kernel():
    """The native decode kernel, or None (see ``_kernel_or_none``)."""
    return _kernel_or_none(_SOURCE, _declare_paged_decode, "paged attention")


def quant_matmul_kernels():
    """The native quantized matmuls, or None (see ``_kernel_or_none``)."""
    return _kernel_or_none(_QUANT_SOURCE, _declare_quant_matmul, "quantized matmul")


def rms_norm_kernel():
    """The native add + RMSNorm, or None (see ``_kernel_or_none``)."""
    return _kernel_or_none(_NORM_SOURCE, _declare_rms_norm, "RMSNorm")


def silu_mul_kernel():
    """The native SiLU * up, or None (see ``_kernel_or_none``)."""
    return _kernel_or_none(_SILU_SOURCE, _declare_silu_mul, "SiLU")


def silu_mul(lib, gu: torch.Tensor) -> torch.Tensor:
    """fp32 contiguous gu [T, 2I] -> silu(gu[:, :I]) * gu[:, I:], [T, I]."""
    T, width = gu.shape
    out = torch.empty(T, width // 2, dtype=gu.dtype)
    lib.dist_infer_silu_mul_f32(gu.data_ptr(), T, width // 2, torch.get_num_threads(), out.data_ptr())
    return out


def decoder_layer_kernel():
    """The native decoder layer's two halves (``native_decoder.py``), or None (see ``_kernel_or_none``)."""
    return _kernel_or_none(_DECODER_SOURCE, _declare_decoder_layer, "decoder layer")


def add_rms_norm(lib, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 contiguous x (and residual) [T, H], weight [H] -> (w * r' / rms(r'), r'), r' = x + residual (None
    without a residual)."""
    T, H = x.shape
    y = torch.empty_like(x)
    r_out = torch.empty_like(x) if residual is not None else None
    lib.dist_infer_add_rms_norm_f32(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                                    weight.data_ptr(), T, H, eps, torch.get_num_threads(),
                                    r_out.data_ptr() if r_out is not None else None, y.data_ptr())
    return y, r_out


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
