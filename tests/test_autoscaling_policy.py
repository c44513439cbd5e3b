"""The autoscaling policy alone (plain Python, a fake clock): Ray Serve's autoscaling_config names and math,
delays before acting, clamping, validation messages."""

from __future__ import annotations

import pytest

from dist_infer.engine.autoscaling import AutoscalingConfig, AutoscalingPolicy


def _config(**overrides) -> AutoscalingConfig:
    settings = dict(min_replicas=1, max_replicas=4, target_ongoing_requests=2, upscale_delay_s=30,
                    downscale_delay_s=60, look_back_period_s=10, metrics_interval_s=5)
    return AutoscalingConfig(**(settings | overrides))


def _run(policy, replicas, load, start, end, step=5):
    """Calls decide every ``step`` seconds over [start, end] with a constant load, applying each decision;
    returns the final count and the times the count changed."""
    changes = []
    for now in range(start, end + 1, step):
        new = policy.decide(now, replicas, load)
        if new != replicas:
            changes.append((now, new))
            replicas = new
    return replicas, changes


def test_defaults_are_ray_serves():
    c = AutoscalingConfig()
    assert (c.min_replicas, c.max_replicas, c.target_ongoing_requests) == (1, 1, 2)
    assert (c.upscale_delay_s, c.downscale_delay_s, c.look_back_period_s, c.metrics_interval_s) == (30, 600, 30, 10)
    assert not c.enabled and c.initial_replicas == 1  # None means min_replicas, resolved at once
    assert _config(min_replicas=2).initial_replicas == 2 and _config(initial_replicas=3).initial_replicas == 3
    assert _config().enabled


def test_scales_up_only_after_the_upscale_delay():
    policy = AutoscalingPolicy(_config())
    # 7 ongoing / target 2 -> ceil(3.5) = 4 replicas wanted from t=0 on.
    for now in range(0, 30, 5):
        assert policy.decide(now, 1, 7) == 1, now
    assert policy.decide(30, 1, 7) == 4
    # The next change waits its own delay again.
    assert policy.decide(35, 4, 0) == 4


def test_scales_down_only_after_the_downscale_delay():
    policy = AutoscalingPolicy(_config())
    # Load 3 on 4 replicas: ceil(1.5) = 2 wanted.
    replicas, changes = _run(policy, 4, 3, 0, 120)
    assert changes == [(60, 2)] and replicas == 2


def test_the_average_over_the_look_back_window_drives_the_wish():
    policy = AutoscalingPolicy(_config(look_back_period_s=10, upscale_delay_s=0))
    assert policy.decide(0, 1, 0) == 1
    assert policy.decide(5, 1, 0) == 1
    # Window (0, 10] holds 0 and 8: mean 4 -> 2 replicas, at once (no delay).
    assert policy.average_ongoing(10) == 0 and policy.decide(10, 1, 8) == 2
    assert policy.average_ongoing(10) == 4


def test_a_spike_shorter_than_the_delay_does_not_scale():
    policy = AutoscalingPolicy(_config(look_back_period_s=5, upscale_delay_s=30))
    replicas, changes = _run(policy, 1, 1, 0, 50)
    replicas, spike = _run(policy, replicas, 100, 55, 70)  # 20 s of heavy load
    replicas, after = _run(policy, replicas, 1, 75, 200)
    assert changes == spike == after == [] and replicas == 1


def test_a_change_of_direction_restarts_the_wait():
    policy = AutoscalingPolicy(_config(look_back_period_s=5, upscale_delay_s=20))
    for now in range(0, 20, 5):
        assert policy.decide(now, 2, 8) == 2  # wants 4
    assert policy.decide(20, 2, 4) == 2  # content at 2: the wait is reset
    for now in range(25, 45, 5):
        assert policy.decide(now, 2, 8) == 2
    assert policy.decide(45, 2, 8) == 4


def test_the_wish_is_clamped_to_the_bounds():
    policy = AutoscalingPolicy(_config(min_replicas=2, max_replicas=3, upscale_delay_s=0, downscale_delay_s=0))
    assert policy.decide(0, 2, 1000) == 3
    assert policy.decide(100, 3, 0) == 2
    assert policy.desired_replicas(2, 1000) == 3 and policy.desired_replicas(3, 0) == 2


def test_a_count_outside_the_bounds_comes_back_at_once():
    policy = AutoscalingPolicy(_config(min_replicas=2, max_replicas=3))
    assert policy.decide(0, 0, 0) == 2  # every replica failed: back to min_replicas without waiting
    assert policy.decide(5, 7, 1000) == 3


def test_desired_replicas_follows_rays_formula():
    policy = AutoscalingPolicy(_config(max_replicas=100))
    assert policy.desired_replicas(1, 8) == 4  # ceil(8 / 2)
    assert policy.desired_replicas(1, 8.000000000001) == 4  # float noise buys no replica
    assert policy.desired_replicas(5, 0) == 1
    smooth = AutoscalingPolicy(_config(max_replicas=100, upscaling_factor=0.5, downscaling_factor=0.5))
    assert smooth.desired_replicas(2, 20) == 6  # ceil(2 + 0.5 * (10 - 2))
    assert smooth.desired_replicas(10, 4) == 6  # ceil(10 + 0.5 * (2 - 10))
    assert smooth.desired_replicas(4, 7) == 4  # ceil(4 + 0.5 * (3.5 - 4)) = 4 = ceil(3.5): no change
    tiny = AutoscalingPolicy(_config(max_replicas=100, downscaling_factor=0.01))
    assert tiny.desired_replicas(4, 5) == 3  # smoothing alone would hold 4 though the load needs 3


def test_decide_rejects_bad_input():
    policy = AutoscalingPolicy(_config())
    with pytest.raises(ValueError, match="ongoing_requests must be >= 0"):
        policy.decide(0, 1, -1)
    with pytest.raises(ValueError, match="num_replicas must be an int"):
        policy.decide(0, 1.5, 1)
    policy.decide(10, 1, 0)
    with pytest.raises(ValueError, match="time went backwards"):
        policy.decide(9, 1, 0)


@pytest.mark.parametrize("kwargs,message", [
    ({"min_replicas": 0}, "min_replicas must be >= 1, got 0 \\(Ray Serve allows 0, but dist-infer"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas \\(2\\) must be >= min_replicas \\(3\\)"),
    ({"max_replicas": 4, "initial_replicas": 5}, "initial_replicas \\(5\\) must lie within"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
    ({"upscale_delay_s": -1}, "upscale_delay_s must be >= 0"),
    ({"downscale_delay_s": -0.5}, "downscale_delay_s must be >= 0"),
    ({"look_back_period_s": 0}, "look_back_period_s must be > 0"),
    ({"upscaling_factor": 0}, "upscaling_factor must be > 0"),
    ({"max_replicas": 2.0}, "max_replicas must be an int"),
    ({"min_replicas": True}, "min_replicas must be an int"),
    ({"upscale_delay_s": "30s"}, "upscale_delay_s must be a number"),
    ({"metrics_interval_s": float("nan")}, "metrics_interval_s must be finite"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoscalingConfig(**kwargs)


def test_from_dict():
    config = AutoscalingConfig.from_dict({"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 5}, "c.yaml")
    assert (config.max_replicas, config.upscale_delay_s, config.downscale_delay_s) == (3, 5.0, 600.0)
    assert AutoscalingConfig.from_dict(None, "c.yaml") == AutoscalingConfig()
    with pytest.raises(ValueError, match="^c.yaml: autoscaling: unknown key 'max_replica' \\(expected one of"):
        AutoscalingConfig.from_dict({"max_replica": 3}, "c.yaml: autoscaling")
    with pytest.raises(ValueError, match="^c.yaml: autoscaling: max_replicas must be an int, got 'three'"):
        AutoscalingConfig.from_dict({"max_replicas": "three"}, "c.yaml: autoscaling")
    with pytest.raises(ValueError, match="^c.yaml: autoscaling: must be a mapping"):
        AutoscalingConfig.from_dict([1, 2], "c.yaml: autoscaling")
