"""PrefixHeat: decayed counts of the requests that reuse a prefix."""

from __future__ import annotations

import math

import pytest

from router.policies.prefix_heat import PrefixHeat


def test_a_steady_rate_reads_about_rate_times_horizon() -> None:
    heat = PrefixHeat(horizon_s=10.0)
    for i in range(2000):  # 5 requests per second for 400 s
        count = heat.record(7, i * 0.2)
    assert count == pytest.approx(5 * 10, rel=0.05)
    assert heat.count(8, 400.0) == 0.0  # another prefix


def test_counts_decay_with_age() -> None:
    heat = PrefixHeat(horizon_s=10.0)
    for _ in range(4):
        heat.record(1, 0.0)
    assert heat.count(1, 0.0) == 4.0
    assert heat.count(1, 10.0) == pytest.approx(4 / math.e)
    # A prefix reused once every few minutes reads about 1 each time.
    assert heat.record(1, 300.0) == pytest.approx(1.0, abs=1e-6)


def test_old_prefixes_are_swept_when_the_map_doubles() -> None:
    heat = PrefixHeat(horizon_s=1.0)
    for key in range(5000):
        heat.record(key, 0.0)
    assert len(heat) == 5000  # the sweep at 4096 kept every fresh count
    for key in range(5000, 8192):
        heat.record(key, 100.0)
    assert len(heat) < 5000 and heat.count(0, 100.0) == 0.0
    assert heat.count(8191, 100.0) == 1.0


def test_horizon_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrefixHeat(0.0)
