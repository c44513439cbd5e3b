"""Paged attention: the native decode kernel and the PyTorch reference path agree, and both match plain
attention over the unpaged keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_infer.layers import native_kernels
from dist_infer.layers.attention import Attention
from dist_infer.layers.forward_context import AttentionMetadata, DecodeBatch, set_forward_context
from dist_infer.layers.native_kernels import (NativeBuildError, build_paged_decode, native_compiler,
                                              native_compiler_available, paged_decode_kernel)


def _require_native_kernel():
    """Skips only where the compiler the build uses is not installed; a compiler that fails on the kernel's
    source fails the test with its message."""
    if not native_compiler_available():
        pytest.skip(f"no C compiler ({native_compiler()}) for the native kernel on this machine")
    build_paged_decode()


def _paged_setup(lengths, Hk, D, bs, seed=0):
    """A shuffled block pool holding random keys/values for sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // bs) for n in lengths]
    num_blocks = sum(blocks) + 3
    cache = torch.randn(2, num_blocks, bs, Hk, D, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for nb in blocks:
        tables.append(order[at:at + nb])
        at += nb
    return cache, tables


def _reference(q, cache, tables, lengths, scale, window):
    """Plain attention per sequence over its keys taken in order from its blocks."""
    outs = []
    Hq, Hk = q.shape[1], cache.shape[3]
    for i, (table, n) in enumerate(zip(tables, lengths)):
        keys = cache[0][table].flatten(0, 1)[:n]  # [n, Hk, D]
        values = cache[1][table].flatten(0, 1)[:n]
        first = max(0, n - window) if window else 0
        k = keys[first:].transpose(0, 1).repeat_interleave(Hq // Hk, 0)
        v = values[first:].transpose(0, 1).repeat_interleave(Hq // Hk, 0)
        outs.append(F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, scale=scale).squeeze(1))
    return torch.stack(outs)


def _check_decode(native, Hq, Hk, D, window, cache, scales, values, tables, lengths):
    """Decodes one query per sequence through ``cache`` and compares with plain attention over ``values``."""
    layer = Attention(Hq, D, Hk, scale=D ** -0.5, sliding_window=window)
    layer.bind_kv_cache(cache, kv_scales=scales)
    assert (layer._native is not None) == native
    width = max(len(t) for t in tables)
    batch = DecodeBatch(len(lengths), torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                        torch.tensor(lengths), max(lengths))
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(1))
    with set_forward_context(AttentionMetadata(torch.empty(0, dtype=torch.long), batch, [])):
        ours = layer._decode(q, batch)
    torch.testing.assert_close(ours, _reference(q, values, tables, lengths, D ** -0.5, window), atol=2e-5, rtol=0)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("Hq,Hk,D,bs,window", [(9, 3, 64, 16, None), (4, 4, 32, 8, None), (8, 1, 16, 4, 7),
                                                (6, 2, 8, 16, 20)])
def test_decode_paths_match_plain_attention(monkeypatch, native, Hq, Hk, D, bs, window):
    monkeypatch.setenv("DIST_INFER_NATIVE_KERNELS", "1" if native else "0")
    if native:
        _require_native_kernel()
    lengths = [1, 5, bs, bs + 1, 3 * bs - 1, 77]
    cache, tables = _paged_setup(lengths, Hk, D, bs)
    _check_decode(native, Hq, Hk, D, window, cache, None, cache, tables, lengths)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("Hq,Hk,D,bs,window", [(9, 3, 64, 16, None), (8, 1, 16, 4, 7)])
def test_int8_cache_decode_paths_match_plain_attention_over_its_values(monkeypatch, native, Hq, Hk, D, bs, window):
    """Keys and values written through the int8 cache: both decode paths attend over exactly the stored values
    (codes times their block's scale), whatever rounding the writes did."""
    from dist_infer.layers.kv_int8 import dequantize_rows, write_int8

    monkeypatch.setenv("DIST_INFER_NATIVE_KERNELS", "1" if native else "0")
    if native:
        _require_native_kernel()
    lengths = [1, 5, bs, bs + 1, 3 * bs - 1, 77]
    full, tables = _paged_setup(lengths, Hk, D, bs)
    cache = torch.zeros(full.shape, dtype=torch.int8)
    scales = torch.zeros(2, full.shape[1], Hk)
    for table, n in zip(tables, lengths):
        slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(n)])
        for kv in range(2):
            write_int8(cache[kv], scales[kv], slots, full[kv].flatten(0, 1)[slots],
                       *torch.unique(slots // bs, return_inverse=True))
    stored = torch.stack([dequantize_rows(cache[kv][None], scales[kv][None], torch.float32)[0] for kv in range(2)])
    _check_decode(native, Hq, Hk, D, window, cache, scales, stored, tables, lengths)


def test_native_kernel_builds_wherever_its_compiler_exists(monkeypatch):
    """The library uses the native kernel by default wherever the compiler exists."""
    monkeypatch.delenv("DIST_INFER_NATIVE_KERNELS", raising=False)
    _require_native_kernel()
    assert paged_decode_kernel() is not None


def test_a_failing_build_raises_and_warns_once_before_falling_back(monkeypatch, tmp_path, caplog):
    """A compiler that is present but fails is an error for ``build_paged_decode`` and, for the library, one
    warning quoting the compiler before the PyTorch path takes over (not a silent fallback, not one per layer)."""
    if not native_compiler_available():
        pytest.skip(f"no C compiler ({native_compiler()}) on this machine")
    broken = tmp_path / "paged_decode.c"
    broken.write_text(native_kernels._SOURCE.read_text() + "\nint this_does_not_compile(void) { return }\n")
    with pytest.raises(NativeBuildError, match="this_does_not_compile"):
        build_paged_decode(broken)
    monkeypatch.setenv("DIST_INFER_NATIVE_KERNELS", "1")
    monkeypatch.setattr(native_kernels, "_SOURCE", broken)
    monkeypatch.setattr(native_kernels, "_failures", set())
    with caplog.at_level("WARNING", logger=native_kernels.__name__):
        assert paged_decode_kernel() is None
        layer = Attention(4, 16, 2, scale=0.25)
        layer.bind_kv_cache(torch.zeros(2, 3, 4, 2, 16))
        assert layer._native is None
    warnings = [r for r in caplog.records if r.name == native_kernels.__name__]
    assert len(warnings) == 1 and "this_does_not_compile" in warnings[0].getMessage()
