"""Paired bootstrap intervals on known cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ctrlora.evaluation.stats import (Interval, bootstrap_diff, bootstrap_gain_ratio, bootstrap_mean, per_scan,
                                      seed_scales, two_level_means)


def test_constant_difference_gives_zero_width_interval():
    rng = np.random.default_rng(0)
    y = rng.random(50)
    iv = bootstrap_diff(y + 0.25, y, n_boot=500)
    assert iv.value == pytest.approx(0.25)
    assert iv.low == pytest.approx(0.25) and iv.high == pytest.approx(0.25)
    assert iv.n == 50 and iv.level == 0.95


def test_interval_covers_known_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = bootstrap_diff(rng.normal(0.3, 1.0, 100), np.zeros(100))
    large = bootstrap_diff(rng.normal(0.3, 1.0, 2000), np.zeros(2000))
    for iv in (small, large):
        assert iv.low < 0.3 < iv.high
        assert iv.low <= iv.value <= iv.high
    assert (large.high - large.low) < 0.5 * (small.high - small.low)


def test_coverage_is_close_to_nominal():
    """Over many independent samples the 95 % interval covers the true mean ~95 % of the time."""
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for k in range(trials):
        iv = bootstrap_mean(rng.exponential(1.0, 80), n_boot=400, seed=k)
        covered += iv.low <= 1.0 <= iv.high
    assert 0.87 <= covered / trials <= 0.99


def test_same_seed_same_interval_other_seed_differs():
    rng = np.random.default_rng(3)
    x, y = rng.random(40), rng.random(40)
    assert bootstrap_diff(x, y, seed=7) == bootstrap_diff(x, y, seed=7)
    assert bootstrap_diff(x, y, seed=7) != bootstrap_diff(x, y, seed=8)
    assert bootstrap_gain_ratio(x + 1, x + 2, y, seed=5) == bootstrap_gain_ratio(x + 1, x + 2, y, seed=5)


def test_pairing_removes_shared_scan_difficulty():
    """Scores dominated by per-scan difficulty: the paired interval on the difference is tight."""
    rng = np.random.default_rng(4)
    difficulty = rng.normal(0, 1.0, 200)
    x = difficulty + 0.1 + rng.normal(0, 0.01, 200)
    iv = bootstrap_diff(x, difficulty)
    assert iv.low > 0.09 and iv.high < 0.11


def test_gain_ratio_known_value_and_joint_resampling():
    rng = np.random.default_rng(5)
    base = rng.random(60)
    single = base + 0.2 + rng.normal(0, 0.02, 60)
    combined = base + 0.18 + rng.normal(0, 0.02, 60)
    iv = bootstrap_gain_ratio(combined, single, base)
    expected = (combined.mean() - base.mean()) / (single.mean() - base.mean())
    assert iv.value == pytest.approx(expected)
    assert iv.low < iv.value < iv.high
    assert iv.low > 0.8 and iv.high < 1.0
    # exact proportional gains on every scan: the ratio is the same on every resample
    exact = bootstrap_gain_ratio(base + 0.1, base + 0.2, base, n_boot=300)
    assert exact.value == pytest.approx(0.5) and exact.low == pytest.approx(0.5) and exact.high == pytest.approx(0.5)


def test_gain_ratio_with_tiny_denominator_gain_is_not_trusted():
    rng = np.random.default_rng(6)
    base = rng.random(50)
    single = base + rng.normal(0.001, 0.05, 50)  # gain indistinguishable from zero
    combined = base + 0.05
    iv = bootstrap_gain_ratio(combined, single, base)
    assert iv.low == -np.inf
    assert not iv.clears(0.9)
    assert iv.to_dict()["low"] is None
    json.dumps(iv.to_dict())
    # no gain at all on the full sample: the ratio is undefined
    none = bootstrap_gain_ratio(base + 0.1, base - 0.01, base)
    assert np.isnan(none.value) and not none.clears(0.0)
    assert none.to_dict()["value"] is None


def test_misaligned_lengths_raise():
    with pytest.raises(ValueError, match="same scans"):
        bootstrap_diff(np.zeros(10), np.zeros(11))
    with pytest.raises(ValueError, match="same scans"):
        bootstrap_gain_ratio(np.zeros(10), np.zeros(10), np.zeros(9))
    with pytest.raises(ValueError, match="same scans"):
        bootstrap_diff(np.zeros((2, 10)), np.zeros(9))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([0.1, float("nan")])
    with pytest.raises(ValueError, match=r"\[scans\]"):
        bootstrap_mean(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="no scans"):
        bootstrap_mean([])


def test_multi_seed_arrays_average_seeds_first():
    rng = np.random.default_rng(7)
    xs = rng.random((3, 30))
    y = rng.random(30)
    assert np.allclose(per_scan(xs), xs.mean(0))
    assert bootstrap_diff(xs, y, seed=1) == bootstrap_diff(xs.mean(0), y, seed=1)
    assert bootstrap_mean(xs, seed=2) == bootstrap_mean(xs.mean(0), seed=2)


def test_interval_clears_uses_lower_end():
    assert Interval(0.3, 0.21, 0.4, 10).clears(0.2)
    assert not Interval(0.3, 0.19, 0.4, 10).clears(0.2)
    assert Interval(0.3, 0.2, 0.4, 10).to_dict() == {"value": 0.3, "low": 0.2, "high": 0.4, "n": 10, "level": 0.95}


# ---------------------------------------------------------------------------- seeds resampled too
def test_resampled_seeds_widen_a_difference_that_holds_only_on_average():
    """A beats B by +0.005 on every scan once seeds are averaged, but A's two seeds are +0.03 and
    +0.00 over the scan baseline and B's are +0.01 twice. Over scans alone the interval is the
    single point +0.005; with seeds resampled (uncorrected), the resamples are exactly -0.01 (A's
    worse seed twice: 1/4), +0.005 (1/2) and +0.02 (1/4), so the 2.5th percentile is -0.01."""
    base = np.random.default_rng(0).random(40)
    a = np.stack([base + 0.03, base + 0.00])
    b = np.stack([base + 0.01, base + 0.01])
    scans_only = bootstrap_diff(a, b)
    assert scans_only.value == pytest.approx(0.005) and scans_only.low == pytest.approx(0.005)
    two = bootstrap_diff(a, b, n_boot=4000, resample_seeds=True, seed_correction=False)
    assert two.value == pytest.approx(0.005)
    assert two.low == pytest.approx(-0.01) and two.high == pytest.approx(0.02)
    assert not two.clears(0.0) and scans_only.clears(0.0)
    # the small-seed correction stretches A's seed deviation (±0.015) by sqrt(2) · t(2) / z
    f = seed_scales([2, 2])[0]
    assert f == pytest.approx(math.sqrt(2) * 4.302653 / 1.959964, rel=1e-5)
    fixed = bootstrap_diff(a, b, n_boot=4000, resample_seeds=True)
    assert fixed.value == pytest.approx(0.005)
    assert fixed.low == pytest.approx(0.005 - 0.015 * f) and fixed.high == pytest.approx(0.005 + 0.015 * f)
    # uncorrected, A whose worse seed still beats B's better one keeps its claim; corrected, two
    # seeds 0.01 apart no longer carry a 0.015 lead, a lead of 0.035 still does
    a2 = np.stack([base + 0.03, base + 0.02])
    assert bootstrap_diff(a2, b, resample_seeds=True, seed_correction=False).low == pytest.approx(0.01)
    assert not bootstrap_diff(a2, b, resample_seeds=True).clears(0.0)
    a3 = np.stack([base + 0.05, base + 0.04])
    assert bootstrap_diff(a3, b, resample_seeds=True).low == pytest.approx(0.035 - 0.005 * f)


def test_seed_scales():
    # one side with one row adds no degrees of freedom and is not stretched
    assert seed_scales([1, 1]) == [1.0, 1.0]
    f3 = seed_scales([3, 1])
    assert f3[1] == 1.0 and f3[0] == pytest.approx(math.sqrt(1.5) * 4.302653 / 1.959964, rel=1e-5)
    # ν = 2 + 2 for 3 seeds a side; many seeds tend to no stretch
    assert seed_scales([3, 3])[0] == pytest.approx(math.sqrt(1.5) * 2.776445 / 1.959964, rel=1e-5)
    assert 1.0 < seed_scales([200, 200])[0] < 1.01
    # a wider level uses a further quantile
    assert seed_scales([3, 3], level=0.99)[0] > seed_scales([3, 3])[0]


def test_resampled_seeds_with_one_seed_per_side_is_the_scan_bootstrap():
    rng = np.random.default_rng(3)
    x, y, z = rng.random(50), rng.random(50), rng.random(50) - 0.4
    for got, want in ((bootstrap_diff(x, y, seed=5, resample_seeds=True), bootstrap_diff(x, y, seed=5)),
                      (bootstrap_mean(x[None], seed=5, resample_seeds=True), bootstrap_mean(x, seed=5)),
                      (bootstrap_gain_ratio(x, y, z, seed=5, resample_seeds=True), bootstrap_gain_ratio(x, y, z, seed=5))):
        assert got.value == pytest.approx(want.value) and got.n == want.n
        assert got.low == pytest.approx(want.low) and got.high == pytest.approx(want.high)


def test_resampled_seeds_gain_ratio_known_case():
    """Combined keeps 0.95 and 0.80 of the single gain (+0.2 over the uncontrolled scan baseline)
    in its two seeds: on average 0.875, and with seeds resampled (uncorrected) the worse seed
    twice gives 0.80. Corrected, the ±0.075 seed deviation of the ratio is stretched by
    sqrt(2) · t(1) / z (only the combined side has seeds: ν = 1)."""
    base = np.random.default_rng(1).random(30)
    single = base + 0.2
    comb = np.stack([base + 0.19, base + 0.16])
    r = bootstrap_gain_ratio(comb, single, base, n_boot=4000, resample_seeds=True, seed_correction=False)
    assert r.value == pytest.approx(0.875)
    assert r.low == pytest.approx(0.80) and r.high == pytest.approx(0.95)
    assert bootstrap_gain_ratio(comb, single, base).low == pytest.approx(0.875)
    f = seed_scales([2, 1, 1])[0]
    c = bootstrap_gain_ratio(comb, single, base, n_boot=4000, resample_seeds=True)
    assert c.low == pytest.approx(0.875 - 0.075 * f) and c.high == pytest.approx(0.875 + 0.075 * f)


def test_two_level_means_are_the_resamples_of_the_bootstrap_functions():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0.5, 0.1, (3, 30)), rng.normal(0.45, 0.1, (2, 30))
    for corr in (True, False):
        ma, mb = two_level_means([a, b], n_boot=500, seed=2, seed_correction=corr)
        got = bootstrap_diff(a, b, n_boot=500, seed=2, resample_seeds=True, seed_correction=corr)
        assert np.quantile(ma - mb, 0.025) == pytest.approx(got.low)
        assert np.quantile(ma - mb, 0.975) == pytest.approx(got.high)
    with pytest.raises(ValueError, match="same scans"):
        two_level_means([a, b[:, :5]])


def test_resampled_seeds_still_need_the_same_scans():
    with pytest.raises(ValueError, match="same scans"):
        bootstrap_diff(np.zeros((2, 5)), np.zeros((2, 6)), resample_seeds=True)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_diff(np.array([[0.1, np.nan]]), np.zeros((1, 2)), resample_seeds=True)
