"""The memorization audit: exact nearest neighbours, a set of copies caught (share near 1, shown
in the grid), a set from the test distribution passed (share near the percentile), the source
scan bookkeeping, VAE latent features, and refusals of bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlora.downstream.memorization import (
    audit,
    closest_pairs,
    closest_pairs_grid,
    latent_features,
    nearest,
    pixel_features,
    wilson_interval,
)
from ctrlora.evaluation.grids import PAD, TITLE_H, grid_size

SIZE = 16  # px: enough structure for distances to spread, small enough to stay fast


def photos(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Smooth random 'photographs' (uint8 n×size×size×3): a 4×4 colour field upsampled, plus
    camera noise. Every call with a new seed draws fresh images from the same distribution."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, size=(n, 4, 4, 3))
    up = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
    return np.clip(np.round(up + rng.normal(0, 6, size=up.shape)), 0, 255).astype(np.uint8)


def noisy_copies(images: np.ndarray, seed: int, sigma: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(images + rng.normal(0, sigma, images.shape)), 0, 255).astype(np.uint8)


def brute_force(q: np.ndarray, r: np.ndarray, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((q.astype(np.float64)[:, None, :] - r.astype(np.float64)[None]) ** 2).sum(-1))
    if exclude is not None:
        d[np.arange(len(q)), exclude] = np.inf
    return d.min(axis=1), d.argmin(axis=1)


def all_plain(x) -> bool:
    """True when ``x`` is made only of JSON's own Python types (no numpy scalars)."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and all_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(all_plain(v) for v in x)
    return x is None or type(x) in (bool, int, float, str)


def test_pixel_features_distance_is_rms_pixel_difference():
    a, b = photos(1, 0), photos(1, 1)
    f = pixel_features(np.concatenate([a, b]))
    assert f.dtype == np.float32 and f.shape == (2, SIZE * SIZE * 3)
    rms = np.sqrt(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))
    assert np.linalg.norm(f[0].astype(np.float64) - f[1]) == pytest.approx(rms, rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_nearest_matches_brute_force(chunk):
    rng = np.random.default_rng(3)
    q, r = rng.normal(size=(23, 10)).astype(np.float32), rng.normal(size=(31, 10)).astype(np.float32)
    r[5] = q[2]  # an exact copy: distance 0, not a small negative square root
    d, i = nearest(q, r, chunk=chunk)
    bd, bi = brute_force(q, r)
    np.testing.assert_allclose(d, bd, rtol=1e-12)
    np.testing.assert_array_equal(i, bi)
    assert d[2] == 0.0 and i[2] == 5
    assert d.dtype == np.float64 and i.dtype == np.int64


def test_nearest_exclude_skips_the_query_itself():
    x = pixel_features(photos(40, 4))
    d, i = nearest(x, x, chunk=8, exclude=np.arange(40))
    bd, bi = brute_force(x, x, exclude=np.arange(40))
    assert (i != np.arange(40)).all() and (d > 0).all()
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, rtol=1e-12)
    d0, i0 = nearest(x, x)  # without exclude every row finds itself
    assert (d0 == 0).all()
    np.testing.assert_array_equal(i0, np.arange(40))


def test_copies_of_training_images_are_caught_and_shown(tmp_path):
    train, test = photos(120, 10), photos(100, 11)
    picked = np.arange(0, 120, 2)  # 60 training images
    generated = np.concatenate([train[picked[:30]], noisy_copies(train[picked[30:]], 12)])
    res = audit(pixel_features(generated), pixel_features(train), pixel_features(test),
                source=picked, percentile=5.0, n_boot=300)
    s = res.summary
    assert s["generated_share"]["value"] == 1.0 and s["generated_below"] == 60
    assert s["generated_share"]["low"] == 1.0  # every generated image is below every resampled threshold
    assert s["generated_share_wilson"]["low"] > 0.9
    assert s["median_ratio"] < 0.2
    np.testing.assert_array_equal(res.generated_nearest, picked)
    assert s["source"]["nearest_is_source"]["value"] == 1.0 and s["source"]["below_threshold"] == 1.0
    assert all_plain(s) and json.loads(json.dumps(s)) == s

    # the grid: the 8 closest are exact copies (distance ~0), each beside its training photograph,
    # with a black difference cell; further down, a noisy copy shows a non-black difference
    top = closest_pairs(res.generated_distance, 60)
    np.testing.assert_array_equal(top[:30], np.arange(30))  # exact copies read exactly 0, ties in order
    assert (res.generated_distance[:30] == 0).all() and (res.generated_distance[30:] > 0).all()
    order = top[[0, 7, 30]]
    out = closest_pairs_grid(generated, train, res.generated_nearest, res.generated_distance,
                             tmp_path / "grid.png", n=31, source=picked, threshold=s["threshold"], scale=2)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1::-1] == grid_size(31, 3, (SIZE, SIZE), 2, titles=True, row_label_w=60)
    cell = SIZE * 2
    for row, g in zip((0, 7, 30), order):
        y = TITLE_H + PAD + row * (cell + PAD)
        cells = [img[y:y + cell, 60 + PAD + c * (cell + PAD):][:, :cell] for c in range(3)]
        up = lambda a: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)  # noqa: E731
        np.testing.assert_array_equal(cells[0], up(generated[g]))
        np.testing.assert_array_equal(cells[1], up(train[picked[g]]))  # its training photograph
        assert (cells[2].max() == 0) == (row < 30)


def test_fresh_images_from_the_test_distribution_pass():
    train, test, fresh = photos(300, 20), photos(400, 21), photos(400, 22)
    pct = 5.0
    s = audit(pixel_features(fresh), pixel_features(train), pixel_features(test), percentile=pct,
              n_boot=500, seed=1).summary
    share = s["generated_share"]
    assert abs(share["value"] - pct / 100) < 0.04
    assert share["low"] <= pct / 100 <= share["high"]
    assert share["high"] - share["low"] > 0.01  # an interval, not a point
    assert abs(s["test_share"] - pct / 100) < 0.01  # the sanity line: ~percentile by construction
    assert 0.9 < s["median_ratio"] < 1.1
    assert s["generated_distance"]["p1"] <= s["generated_distance"]["p5"] <= s["generated_distance"]["p50"]
    # the same fresh set with a few copies mixed in reads higher
    mixed = np.concatenate([fresh[:360], noisy_copies(train[:40], 23)])
    s2 = audit(pixel_features(mixed), pixel_features(train), pixel_features(test), percentile=pct,
               n_boot=500, seed=1).summary
    assert s2["generated_share"]["low"] > share["high"]


def test_source_share_counts_own_scan_nearest():
    train, test = photos(50, 30), photos(60, 31)
    # 10 noisy copies of their source, 10 fresh images whose "source" is an arbitrary train row
    src = np.array(list(range(10)) + list(range(20, 30)))
    generated = np.concatenate([noisy_copies(train[:10], 32), photos(10, 33)])
    g, tr, te = pixel_features(generated), pixel_features(train), pixel_features(test)
    res = audit(g, tr, te, source=src, percentile=10.0, n_boot=200)
    _, bi = brute_force(g, tr)
    own = int(np.sum(bi == src))
    assert own >= 10  # the copies' nearest row is their source
    info = res.summary["source"]
    assert info["nearest_is_source_count"] == own
    assert info["nearest_is_source"]["value"] == pytest.approx(own / 20)
    w = wilson_interval(own, 20)
    assert (info["nearest_is_source"]["low"], info["nearest_is_source"]["high"]) == pytest.approx((w.low, w.high))
    # distance to the own source, computed directly
    assert res.source_distance is not None
    want = np.linalg.norm(g.astype(np.float64) - tr[src], axis=1)
    np.testing.assert_allclose(res.source_distance, want, rtol=1e-9)
    assert info["below_threshold"] == pytest.approx(np.mean(want < res.summary["threshold"]))
    assert info["distance"]["p50"] == pytest.approx(np.median(want))
    # without source, no source section
    assert "source" not in audit(g, tr, te, percentile=10.0, n_boot=50).summary


def test_share_interval_carries_the_threshold_uncertainty():
    # 1-D features: test-to-train distances 1..5, threshold (50th percentile) 3; every generated
    # image sits at 2.9, just below it. At the fixed threshold the share is 1 (Wilson stays high);
    # resampling the test images moves the threshold below 2.9 in many resamples, so the
    # bootstrap interval must reach down to 0.
    train, test = np.zeros((1, 1)), np.arange(1.0, 6.0)[:, None]
    generated = np.full((10, 1), 2.9)
    s = audit(generated, train, test, percentile=50.0, n_boot=400, seed=3).summary
    assert s["threshold"] == 3.0 and s["generated_share"]["value"] == 1.0
    assert s["generated_share"]["low"] == 0.0 and s["generated_share"]["high"] == 1.0
    assert s["generated_share_wilson"]["low"] > 0.6
    assert audit(generated, train, test, percentile=50.0, n_boot=400, seed=3).summary == s  # seeded


def test_wilson_interval_known_values():
    w = wilson_interval(0, 100)
    assert w.value == 0.0 and w.low == 0.0 and w.high == pytest.approx(0.0370, abs=5e-4)
    w = wilson_interval(50, 100)
    assert (w.low, w.high) == pytest.approx((0.4038, 0.5962), abs=5e-4)


def test_latent_features_shape_and_determinism():
    from _models_helpers import tiny_test_config
    from ctrlora.models.backbone import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae(tiny_test_config(image_size=32, vae_block_out_channels=(32, 32))).eval()
    images = photos(5, 40, size=32)
    f = latent_features(vae, images, batch_size=2)
    assert f.dtype == np.float32 and f.shape == (5, 4 * 16 * 16)
    np.testing.assert_array_equal(f, latent_features(vae, images, batch_size=2))
    np.testing.assert_allclose(f, latent_features(vae, images, batch_size=5), atol=1e-5)
    # the posterior mean of the photograph in [-1, 1], RMS-scaled
    x = torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean.reshape(5, -1).numpy()
    np.testing.assert_allclose(f, mean / np.sqrt(mean.shape[1]), atol=1e-5)
    assert abs(f[0] - f[1]).max() > 0  # different images, different features


def test_bad_input_is_refused_by_name():
    a = pixel_features(photos(10, 50))
    with pytest.raises(ValueError, match="feature dims differ"):
        nearest(a, a[:, :-1])
    with pytest.raises(ValueError, match="feature dims differ"):
        audit(a, a, a[:, :-1])
    with pytest.raises(ValueError, match="generated is empty"):
        audit(a[:0], a, a)
    with pytest.raises(ValueError, match="refs is empty"):
        nearest(a, a[:0])
    for p in (0.0, 100.0, -1.0, 150.0):
        with pytest.raises(ValueError, match="percentile"):
            audit(a, a, a, percentile=p)
    with pytest.raises(ValueError, match="source"):
        audit(a, a, a, source=np.arange(9))
    with pytest.raises(ValueError, match="source"):
        audit(a, a, a, source=np.arange(10) + 5)
    with pytest.raises(ValueError, match="exclude"):
        nearest(a, a, exclude=np.arange(3))
    with pytest.raises(ValueError, match="uint8"):
        pixel_features(photos(2, 51).astype(np.float32))
    with pytest.raises(ValueError, match="N×H×W×3"):
        pixel_features(photos(2, 51)[..., 0])
    with pytest.raises(ValueError, match="images is empty"):
        pixel_features(photos(2, 51)[:0])
    with pytest.raises(ValueError, match="non-finite"):
        nearest(np.full((2, 3), np.nan), a[:, :3])
