"""The planner's communication costs: a real (tiny) gloo profile, and the cost model on hand-written profiles."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dist_infer.planner.comm_profile import OPS, CommModel, default_sizes, load_or_profile, profile_collectives


def _profile(tables: dict) -> dict:
    return {"backend": "gloo", "device": "cpu", "threads_per_rank": 1,
            "ops": {op: {str(n): {"bytes": xs, "seconds": ts} for n, (xs, ts) in by_size.items()}
                    for op, by_size in tables.items()}}


def test_a_real_gloo_profile_has_the_documented_structure():
    sizes = [4096, 65536]
    data = profile_collectives([2], sizes, repeats=3, timeout_s=60)
    assert json.loads(json.dumps(data)) == data
    assert (data["backend"], data["device"], data["threads_per_rank"]) == ("gloo", "cpu", 1)
    assert set(data["ops"]) == set(OPS)
    for op in OPS:
        assert list(data["ops"][op]) == ["2"]
        table = data["ops"][op]["2"]
        assert table["bytes"] == sizes  # all_gather: the gathered tensor, each of the 2 ranks handing in half
        assert len(table["seconds"]) == 2 and all(math.isfinite(t) and 0 < t < 5 for t in table["seconds"])
    model = CommModel.from_profile(data)
    assert model.time("all_gather", 2048, 2) == data["ops"]["all_gather"]["2"]["seconds"][0]
    assert model.time("all_reduce", 4096, 3) > 0  # a size never measured: fitted and scaled


def test_measured_model_interpolates_and_extrapolates_within_a_group_size():
    model = CommModel.from_profile(_profile({"all_reduce": {2: ([4000, 1000, 2000], [3.0, 1.0, 2.0])},
                                             "all_gather": {2: ([1000, 2000], [1.0, 2.0])},
                                             "send_recv": {2: ([1000, 3000], [0.5, 1.5])}}))
    assert model.time("all_reduce", 1500, 2) == pytest.approx(1.5)
    assert model.time("all_reduce", 3000, 2) == pytest.approx(2.5)
    assert model.time("all_reduce", 10, 2) == 1.0  # below the smallest: the smallest's time
    assert model.time("all_reduce", 6000, 2) == pytest.approx(4.0)  # on at the last two points' 2000 B/s
    assert model.time("all_gather", 750, 2) == pytest.approx(1.5)  # 750 B per rank gather into 1500 B
    assert model.time("send_recv", 2000, 4) == pytest.approx(1.0)  # a pair, whatever the pipeline's depth
    assert model.time("all_reduce", 10**6, 1) == 0.0 and model.time("send_recv", 10**6, 1) == 0.0
    # Noise that made the last step negative: the last point's average bandwidth instead.
    noisy = CommModel.from_profile(_profile({"all_reduce": {2: ([1000, 2000], [2.0, 1.0])}}))
    assert noisy.time("all_reduce", 4000, 2) == pytest.approx(2.0)
    assert CommModel.from_profile(model.to_dict()).to_dict() == model.to_dict()


def test_an_unmeasured_group_size_scales_the_nearest_fit_by_the_ring_factors():
    alpha, beta = 1e-4, 1e-9
    xs = [4096, 65536, 10**6]
    line = [alpha + beta * x for x in xs]
    model = CommModel.from_profile(_profile({"all_reduce": {2: (xs, line), 8: (xs, [10 * t for t in line])},
                                             "all_gather": {2: (xs, line)}}))
    # all_reduce: latency x 2(n-1), bandwidth x 2(n-1)/n; at n=2 that is (2, 1), at n=3 (4, 4/3).
    assert model.time("all_reduce", 5000, 3) == pytest.approx(alpha * 4 / 2 + beta * (4 / 3) * 5000)
    # all_gather: (n-1), (n-1)/n of the gathered bytes; at n=2 (1, 1/2), at n=4 (3, 3/4); 5000 B per rank.
    assert model.time("all_gather", 5000, 4) == pytest.approx(alpha * 3 + beta * (3 / 4) / (1 / 2) * 20000)
    assert model.time("all_reduce", 5000, 7) == pytest.approx(10 * (alpha * 12 / 14 + beta * 5000 * (12 / 7) / (14 / 8)))
    # Off a line: beta from the largest two messages (1e-3 s/B), alpha what the smallest leaves (1.5 - 1 s).
    bent = CommModel.from_profile(_profile({"all_reduce": {2: ([1000, 2000, 4000], [1.5, 2.0, 4.0])}}))
    assert bent.time("all_reduce", 3000, 3) == pytest.approx(0.5 * 4 / 2 + 1e-3 * (4 / 3) / 1 * 3000)


def test_link_model_follows_the_ring_formulas():
    model = CommModel.from_links(1e9, 1e-5)
    assert model.time("all_reduce", 10**6, 4) == pytest.approx(2 * 3 / 4 * 1e-3 + 2 * 3 * 1e-5)
    assert model.time("all_gather", 10**6, 4) == pytest.approx(3 / 4 * 4e-3 + 3 * 1e-5)  # gathers 4 MB
    assert model.time("send_recv", 10**6, 2) == pytest.approx(1e-3 + 1e-5)
    assert model.time("all_reduce", 10**6, 1) == 0.0
    assert CommModel.from_profile(model.to_dict()).time("all_reduce", 10**6, 4) == model.time("all_reduce", 10**6, 4)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        CommModel.from_links(0, 1e-5)


def test_unknown_ops_and_missing_measurements_are_clear_errors():
    measured = CommModel.from_profile(_profile({"all_reduce": {2: ([1000], [1.0])}}))
    for model in (measured, CommModel.from_links(1e9, 1e-5)):
        with pytest.raises(ValueError, match="unknown communication op 'reduce_scatter'; valid ops: all_reduce, "
                                             "all_gather, send_recv"):
            model.time("reduce_scatter", 1000, 2)
    with pytest.raises(ValueError, match="no send_recv measurements"):
        measured.time("send_recv", 1000, 2)
    with pytest.raises(ValueError, match="valid ops"):
        CommModel.from_profile(_profile({"broadcast": {2: ([1000], [1.0])}}))
    with pytest.raises(ValueError, match="group sizes must be at least 2"):
        profile_collectives([1], [4096])


def test_default_sizes_and_a_saved_profile(tmp_path):
    sizes = default_sizes()
    assert sizes[0] == 4096 and sizes[-1] == 64 * 2**20 and all(b == 4 * a for a, b in zip(sizes, sizes[1:]))
    path = tmp_path / "comm.json"
    path.write_text(json.dumps(_profile({"all_reduce": {2: ([1000, 2000], [1.0, 2.0])}})))
    assert load_or_profile(str(path), [2]).time("all_reduce", 1500, 2) == pytest.approx(1.5)  # read, not measured


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to fail")
def test_a_failing_rank_is_an_error_naming_its_step():
    with pytest.raises(RuntimeError, match=r"profiling rank \d failed during init over 2 ranks:\n.*Traceback"):
        profile_collectives([2], [4096], device="cuda", timeout_s=60)
