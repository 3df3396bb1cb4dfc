"""Paired bootstrap intervals on known cases."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrlora.evaluation.stats import Interval, bootstrap_diff, bootstrap_gain_ratio, bootstrap_mean, per_scan


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
    single point +0.005; with seeds resampled, the resamples are exactly -0.01 (A's worse seed
    twice: 1/4), +0.005 (1/2) and +0.02 (1/4), so the 2.5th percentile is -0.01."""
    base = np.random.default_rng(0).random(40)
    a = np.stack([base + 0.03, base + 0.00])
    b = np.stack([base + 0.01, base + 0.01])
    scans_only = bootstrap_diff(a, b)
    assert scans_only.value == pytest.approx(0.005) and scans_only.low == pytest.approx(0.005)
    two = bootstrap_diff(a, b, n_boot=4000, resample_seeds=True)
    assert two.value == pytest.approx(0.005)
    assert two.low == pytest.approx(-0.01) and two.high == pytest.approx(0.02)
    assert not two.clears(0.0) and scans_only.clears(0.0)
    # A whose worse seed still beats B's better one keeps its claim
    a2 = np.stack([base + 0.03, base + 0.02])
    assert bootstrap_diff(a2, b, resample_seeds=True).low == pytest.approx(0.01)


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
    in its two seeds: on average 0.875, and with seeds resampled the worse seed twice gives 0.80."""
    base = np.random.default_rng(1).random(30)
    single = base + 0.2
    comb = np.stack([base + 0.19, base + 0.16])
    r = bootstrap_gain_ratio(comb, single, base, n_boot=4000, resample_seeds=True)
    assert r.value == pytest.approx(0.875)
    assert r.low == pytest.approx(0.80) and r.high == pytest.approx(0.95)
    assert bootstrap_gain_ratio(comb, single, base).low == pytest.approx(0.875)


def test_resampled_seeds_still_need_the_same_scans():
    with pytest.raises(ValueError, match="same scans"):
        bootstrap_diff(np.zeros((2, 5)), np.zeros((2, 6)), resample_seeds=True)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_diff(np.array([[0.1, np.nan]]), np.zeros((1, 2)), resample_seeds=True)
