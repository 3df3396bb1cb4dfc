"""The user's segmenter (MONAI U-Net) and the reading of the utility curves."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctrlora.downstream.curves import real_images_worth, worth_interval
from ctrlora.evaluation.stats import seed_scales
from ctrlora.downstream.segmenter import (load_segmenter, predict, save_segmenter, score, segmenter_config,
                                          train_segmenter)

pytest.importorskip("monai")


def shapes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Photographs of one bright disc (class 1) and one dark square (class 2) on a mid background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.full((n, size, size, 3), 120, np.uint8)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 7))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        sy, sx = rng.integers(2, size - 8, 2)
        sq = np.zeros_like(disc)
        sq[sy:sy + 6, sx:sx + 6] = True
        sq &= ~disc
        imgs[i][disc], imgs[i][sq] = 230, 20
        labels[i][disc], labels[i][sq] = 1, 2
    imgs = np.clip(imgs + rng.normal(0, 8, imgs.shape), 0, 255).astype(np.uint8)
    return imgs, labels


CFG = dict(channels=(8, 16, 32), strides=(2, 2), steps=80, batch_size=8, learning_rate=1e-2)


def test_learns_shapes_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    x, y = shapes(24, 0)
    tx, ty = shapes(16, 1)
    untrained, _ = train_segmenter(x, y, 3, segmenter_config(CFG, steps=1))
    model, losses = train_segmenter(x, y, 3, segmenter_config(CFG))
    assert losses[-1] < losses[0]
    s = score(model, tx, ty, 3)
    assert s.shape == (16,) and s.mean() > 0.6 > score(untrained, tx, ty, 3).mean()
    save_segmenter(model, segmenter_config(CFG), 3, tmp_path / "seg")
    again, cfg, k = load_segmenter(tmp_path / "seg")
    assert k == 3 and cfg.channels == (8, 16, 32)
    np.testing.assert_array_equal(predict(again, tx), predict(model, tx))


def test_deterministic_and_mixes_generated_images():
    torch.set_num_threads(1)
    x, y = shapes(8, 0)
    gx, gy = shapes(8, 5)
    a, la = train_segmenter(x, y, 3, segmenter_config(CFG, steps=5, augment=True, seed=3), gx, gy)
    b, lb = train_segmenter(x, y, 3, segmenter_config(CFG, steps=5, augment=True, seed=3), gx, gy)
    assert la == lb
    c, lc = train_segmenter(x, y, 3, segmenter_config(CFG, steps=5, augment=True, seed=4), gx, gy)
    assert lc != la
    # generated images take part: other generated images, other losses
    d, ld = train_segmenter(x, y, 3, segmenter_config(CFG, steps=5, augment=True, seed=3), gx[::-1].copy(), gy[::-1].copy())
    assert ld != la


def test_bad_input_is_named():
    x, y = shapes(4, 0)
    with pytest.raises(ValueError, match="unknown setting"):
        segmenter_config({"stepz": 3})
    with pytest.raises(ValueError, match="label ids"):
        train_segmenter(x, y + 5, 3, segmenter_config(CFG, steps=1))
    with pytest.raises(ValueError, match="do not match"):
        train_segmenter(x, y[:, :5], 3, segmenter_config(CFG, steps=1))
    with pytest.raises(ValueError, match="real_share"):
        segmenter_config(CFG, real_share=0.0)


def test_real_images_worth_interpolates_in_log_n():
    n, m = [25, 50, 100, 200], [0.40, 0.50, 0.60, 0.70]
    w = real_images_worth(n, m, 50, 0.55)
    assert w["equivalent_n"] == pytest.approx(np.sqrt(50 * 100)) and w["worth"] == pytest.approx(np.sqrt(5000) - 50)
    assert real_images_worth(n, m, 50, 0.50)["worth"] == pytest.approx(0.0)
    assert real_images_worth(n, m, 50, 0.75)["above"] and real_images_worth(n, m, 50, 0.3)["below"]
    # a dip in the real-only curve is ironed out: the first N that reaches the target counts
    assert real_images_worth(n, [0.4, 0.6, 0.55, 0.7], 50, 0.58)["equivalent_n"] < 50


def test_worth_interval_covers_the_point_and_flags_the_curve_end():
    rng = np.random.default_rng(0)
    scans = 60
    curve = {k: (0.1 * np.log2(k) + rng.normal(0, 0.05, (3, scans))) for k in (25, 50, 100, 200)}
    arm = 0.1 * np.log2(100) + rng.normal(0, 0.05, (3, scans))
    w = worth_interval(curve, arm, 50, n_boot=300)
    assert w["low"] <= w["worth"] <= w["high"] and 20 < w["worth"] < 90
    top = worth_interval(curve, arm + 1.0, 50, n_boot=100)
    assert top["above"] and top["high"] == "above_curve"
    with pytest.raises(ValueError, match="same scans"):
        worth_interval(curve, arm[:, :10], 50, n_boot=10)


def test_worth_interval_carries_the_small_seed_correction():
    """Real-only curve 0.4 / 0.5 / 0.6 / 0.7 at N = 25 … 200 (three identical seeds each), arm at
    N = 50 with two seeds at 0.53 and 0.57 over a shared per-scan difficulty (which the worth
    ignores). Uncorrected, the arm's resampled mean is 0.53, 0.55 or 0.57, so the interval runs
    from the worth of 0.53 to that of 0.57. Corrected, the arm's ±0.02 seed deviation is stretched
    by stats.seed_scales with ν pooled over every array (2 · 4 + 1 = 9)."""
    base = np.random.default_rng(4).normal(0, 0.05, 40)
    keys, means = [25, 50, 100, 200], [0.4, 0.5, 0.6, 0.7]
    curve = {k: np.stack([base + m] * 3) for k, m in zip(keys, means)}
    arm = np.stack([base + 0.53, base + 0.57])

    def worth_at(target: float) -> float:
        return real_images_worth(keys, means, 50, target)["worth"]

    plain = worth_interval(curve, arm, 50, n_boot=2000, seed_correction=False)
    assert plain["worth"] == pytest.approx(worth_at(0.55))
    assert plain["low"] == pytest.approx(worth_at(0.53)) and plain["high"] == pytest.approx(worth_at(0.57))
    f = seed_scales([3, 3, 3, 3, 2])[-1]
    assert f == pytest.approx(math.sqrt(2) * 2.262157 / 1.959964, rel=1e-5)
    fixed = worth_interval(curve, arm, 50, n_boot=2000)
    assert fixed["worth"] == plain["worth"]
    assert fixed["low"] == pytest.approx(worth_at(0.55 - 0.02 * f))
    assert fixed["high"] == pytest.approx(worth_at(0.55 + 0.02 * f))
    # one seed row everywhere: nothing to correct, the scans-only interval either way
    one = {k: v[:1] for k, v in curve.items()}
    assert worth_interval(one, arm[:1], 50, n_boot=200) == worth_interval(one, arm[:1], 50, n_boot=200,
                                                                          seed_correction=False)
