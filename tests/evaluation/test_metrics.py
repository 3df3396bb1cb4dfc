"""Metric functions on known inputs, grids, and the re-detectors on tiny synthetic shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlora.evaluation import metrics
from ctrlora.evaluation.detectors import (
    CannyParams,
    DetectorConfig,
    detect_canny,
    load_detector,
    predict,
    save_detector,
    train_detector,
)
from ctrlora.evaluation.fidelity import (
    PRIMARY_METRIC,
    condition_fidelity,
    condition_scores,
    image_metrics,
    image_scores,
    primary_fidelity,
)
from ctrlora.evaluation.grids import PAD, TITLE_H, colorize_labels, plot_curves, save_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- segmentation


def test_miou_identical_disjoint_and_partial():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, size=(2, 8, 8))
    assert metrics.miou(lab, lab, 4) == 1.0
    assert metrics.pixel_accuracy(lab, lab) == 1.0

    a = np.zeros((4, 4), int)
    b = np.ones((4, 4), int)
    assert metrics.miou(a, b, 2) == 0.0
    assert metrics.pixel_accuracy(a, b) == 0.0

    # class 1 occupies 4 pixels in pred, 6 in truth, 4 shared: IoU(1) = 4/6;
    # class 0: pred 12 px, truth 10 px, shared 10: IoU(0) = 10/12.
    pred = np.zeros((4, 4), int)
    true = np.zeros((4, 4), int)
    pred[0, :4] = 1
    true[0, :4] = 1
    true[1, :2] = 1
    assert metrics.miou(pred, true, 3) == pytest.approx((4 / 6 + 10 / 12) / 2)
    # class 2 absent from both: counted as 1.0 only when not ignored
    assert metrics.miou(pred, true, 3, ignore_absent=False) == pytest.approx((4 / 6 + 10 / 12 + 1) / 3)
    assert metrics.pixel_accuracy(pred, true) == pytest.approx(14 / 16)


def test_segmentation_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.miou(np.zeros((4, 4), int), np.zeros((4, 5), int), 2)
    with pytest.raises(ValueError, match="outside"):
        metrics.miou(np.full((2, 2), 3), np.zeros((2, 2), int), 3)
    with pytest.raises(ValueError, match="integer"):
        metrics.miou(np.zeros((2, 2)), np.zeros((2, 2), int), 3)


# --------------------------------------------------------------------------- edges


def test_edge_f1_identical_shifted_far_and_empty():
    e = np.zeros((2, 16, 16), bool)
    e[:, 4:12, 8] = True
    assert metrics.edge_f1(e, e) == 1.0
    shifted = np.roll(e, 1, axis=2)
    assert metrics.edge_f1(shifted, e, tolerance_px=1) == 1.0
    assert metrics.edge_f1(shifted, e, tolerance_px=0) == 0.0
    far = np.roll(e, 5, axis=2)
    assert metrics.edge_f1(far, e, tolerance_px=1) == 0.0
    # half the predicted pixels right, all truth recovered: P = 0.5, R = 1
    half = e.copy()
    half[:, 4:12, 14] = True
    s = metrics.edge_scores(half, e)
    assert (s["precision"], s["recall"]) == (0.5, 1.0)
    assert s["f1"] == pytest.approx(2 / 3)
    z = np.zeros((8, 8), bool)
    assert metrics.edge_f1(z, z) == 1.0
    assert metrics.edge_f1(z, e[0, :8, :8] | True) == 0.0


def test_edge_tolerance_does_not_cross_images():
    a = np.zeros((2, 8, 8), bool)
    b = np.zeros((2, 8, 8), bool)
    a[0, 7, 3] = True  # bottom row of image 0
    b[1, 0, 3] = True  # top row of image 1: adjacent in memory, not in space
    assert metrics.edge_f1(a, b, tolerance_px=1) == 0.0


# --------------------------------------------------------------------------- images


def test_psnr_identical_and_known_noise():
    a = np.random.default_rng(1).random((16, 16, 3))
    assert metrics.psnr(a, a, 1.0) == math.inf
    # a constant offset of 0.1 has MSE 0.01 -> 20 dB at range 1
    assert metrics.psnr(a, a + 0.1, 1.0) == pytest.approx(20.0)
    # +/-5 on a 255 range: MSE 25 -> 10 log10(255^2 / 25)
    signs = np.where(np.random.default_rng(2).random((16, 16)) < 0.5, -5.0, 5.0)
    assert metrics.psnr(np.zeros((16, 16)), signs, 255.0) == pytest.approx(10 * math.log10(255**2 / 25))
    stack = np.stack([a, a])
    assert metrics.mean_psnr(stack, stack, 1.0) == 100.0
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.psnr(a, a[:8], 1.0)


def test_ssim_identical_small_and_errors():
    rng = np.random.default_rng(3)
    img = rng.random((64, 64, 3))
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    assert metrics.ssim(img, rng.random((64, 64, 3))) < 0.2
    small = rng.random((8, 8))
    assert metrics.ssim(small, small) == pytest.approx(1.0)
    gray_stack = rng.random((3, 64, 64))
    assert metrics.mean_ssim(gray_stack, gray_stack) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="channel axis"):
        metrics.ssim(gray_stack, gray_stack)
    with pytest.raises(ValueError, match="data_range"):
        metrics.ssim(img * 3, img * 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.ssim(img, img[..., :1])
    assert metrics.mae(img, img + 0.25) == pytest.approx(0.25)
    assert metrics.rmse(np.zeros(4), np.array([1.0, -1.0, 1.0, -1.0])) == pytest.approx(1.0)


def test_normal_angular_error():
    def enc(v):
        v = np.asarray(v, float)
        return (v / np.linalg.norm(v) + 1) / 2

    z = np.broadcast_to(enc([0, 0, 1]), (4, 4, 3))
    x = np.broadcast_to(enc([1, 0, 0]), (4, 4, 3))
    d = np.broadcast_to(enc([1, 0, 1]), (4, 4, 3))
    assert metrics.normal_angular_error(z, z) == pytest.approx(0.0, abs=1e-6)
    assert metrics.normal_angular_error(x, z) == pytest.approx(90.0)
    assert metrics.normal_angular_error(d, z) == pytest.approx(45.0)
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    mixed = z.copy()
    mixed[1:] = x[1:]
    assert metrics.normal_angular_error(mixed, z, mask) == pytest.approx(0.0, abs=1e-6)
    assert metrics.normal_angular_error(mixed, z) == pytest.approx(90.0 * 12 / 16)
    with pytest.raises(ValueError, match="selects no pixels"):
        metrics.normal_angular_error(z, z, np.zeros((4, 4), bool))


# --------------------------------------------------------------------------- grids


# --------------------------------------------------------------------------- per image


def test_per_image_miou_is_per_image_and_differs_from_pooled():
    true = np.zeros((2, 4, 4), np.int64)
    true[0, :2] = 1            # image 0: half class 1
    true[1, 0, 0] = 1          # image 1: one pixel of class 1
    pred = true.copy()
    pred[1, 0, 0] = 0          # image 1 misses its one pixel
    per = metrics.miou_per_image(pred, true, 2)
    assert per[0] == 1.0
    assert per[1] == pytest.approx((15 / 16 + 0.0) / 2)  # background 15/16, class 1 0/1
    pooled = metrics.miou(pred, true, 2)
    assert pooled == pytest.approx((23 / 24 + 8 / 9) / 2)
    assert per.mean() != pytest.approx(pooled)  # image-averaged vs pooled are different figures
    with pytest.raises(ValueError, match="stack"):
        metrics.miou_per_image(true[0], true[0], 2)


def test_per_image_edges_ssim_psnr_mae_agree_with_their_means():
    rng = np.random.default_rng(5)
    e = np.zeros((3, 12, 12), bool)
    e[0, 6, 2:10] = True
    e[1, 3, 3] = True           # image 2 has no edges at all
    pred = e.copy()
    pred[1] = False             # image 1: the edge is missed
    s = metrics.edge_scores_per_image(pred, e)
    assert s["f1"].tolist() == [1.0, 0.0, 1.0]  # both empty → 1
    assert metrics.edge_scores(pred[:1], e[:1])["f1"] == s["f1"][0]
    a, b = rng.random((4, 16, 16, 3)), rng.random((4, 16, 16, 3))
    assert metrics.ssim_per_image(a, b).mean() == pytest.approx(metrics.mean_ssim(a, b))
    assert metrics.ssim_per_image(a, a) == pytest.approx(np.ones(4))
    assert metrics.psnr_per_image(a, b, 1.0).mean() == pytest.approx(metrics.mean_psnr(a, b, 1.0))
    assert metrics.psnr_per_image(a, a, 1.0).tolist() == [100.0] * 4
    assert metrics.mae_per_image(a, b).mean() == pytest.approx(metrics.mae(a, b))
    assert metrics.mae_per_image(a, b)[2] == pytest.approx(metrics.mae(a[2], b[2]))


def test_per_image_normal_error_marks_empty_masks_nan():
    n = np.full((2, 4, 4, 3), 0.5)
    n[..., 2] = 1.0  # +z everywhere
    mask = np.ones((2, 4, 4), bool)
    mask[1] = False
    err = metrics.normal_angular_error_per_image(n, n, mask)
    assert err[0] == pytest.approx(0.0, abs=1e-6) and np.isnan(err[1])


def test_grid_png_size_and_curves(tmp_path):
    rng = np.random.default_rng(4)
    rows = [
        [colorize_labels(rng.integers(0, 10, (64, 64))), rng.random((64, 64, 3)), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
        for _ in range(2)
    ]
    path = save_grid(rows, tmp_path / "g" / "grid.png", titles=["condition", "generated", "ground truth"], scale=2)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (3 * 128 + 4 * PAD, TITLE_H + 2 * 128 + 3 * PAD)
        # nearest-neighbour upscaling: each source pixel becomes a 2×2 block
        cell = np.asarray(im)[TITLE_H + PAD : TITLE_H + PAD + 128, PAD : PAD + 128]
        assert (cell[::2, ::2] == cell[1::2, 1::2]).all()
    gray = save_grid([[rng.random((64, 64)), rng.random((64, 64))]], tmp_path / "gray.png")
    with Image.open(gray) as im:  # default scale makes 64-px cells 128 px
        assert im.size == (2 * 128 + 3 * PAD, 128 + 2 * PAD)
    with pytest.raises(ValueError, match="one size"):
        save_grid([[rng.random((64, 64)), rng.random((32, 32))]], tmp_path / "bad.png")
    curve = plot_curves({"loss": [(0, 1.0), (10, 0.5), (20, 0.3)], "fid": [(0, 0.2), (20, 0.6)]}, tmp_path / "c.png", "loss")
    with Image.open(curve) as im:
        assert im.format == "PNG" and im.size == (600, 400)


# --------------------------------------------------------------------------- detectors


def _shapes(n: int, size: int = 32, seed: int = 0):
    """Coloured discs (label 1) and squares (label 2) on a dark noisy background; the target map
    for regression is the shape's brightness where the shape is, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.empty((n, size, size, 3), np.float32)
    labels = np.zeros((n, size, size), np.int64)
    bright = np.zeros((n, size, size), np.float32)
    for i in range(n):
        imgs[i] = 0.1 + 0.05 * rng.random((size, size, 3))
        for kind in (1, 2):
            cy, cx = rng.integers(7, size - 7, 2)
            r = rng.integers(4, 7)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if kind == 1 else (abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1)
            color = rng.uniform(0.4, 1.0, 3)
            imgs[i][m] = color
            labels[i][m] = kind
            bright[i][m] = color.mean()
    return imgs, labels, bright


@pytest.fixture(scope="module")
def shapes_data():
    return _shapes(48, seed=0), _shapes(16, seed=1)


@pytest.fixture(scope="module")
def segmenter(shapes_data):
    (imgs, labels, _), _ = shapes_data
    cfg = DetectorConfig(task="segmentation", channels=3, width=16, epochs=12, lr=1e-2, batch_size=8, seed=0)
    return train_detector(cfg, imgs, labels, progress=False)


def test_segmenter_beats_trivial_baseline(segmenter, shapes_data):
    _, (imgs, labels, _) = shapes_data
    pred = predict(segmenter, imgs)
    assert pred.shape == labels.shape and pred.dtype == np.int64
    baseline = metrics.miou(np.zeros_like(labels), labels, 3)  # "everything is background"
    score = metrics.miou(pred, labels, 3)
    assert baseline < 0.35
    assert score > 0.75, (score, baseline)
    # the same images as a tensor in [-1, 1] give the same prediction
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2) * 2 - 1
    assert (predict(segmenter, t) == pred).all()


def test_regressor_beats_constant_baseline(shapes_data):
    (imgs, _, bright), (timgs, _, tbright) = shapes_data
    cfg = DetectorConfig(task="regression", channels=1, width=8, epochs=12, lr=1e-2, batch_size=8, seed=0)
    model = train_detector(cfg, imgs, bright, progress=False)
    pred = predict(model, timgs)
    assert pred.shape == tbright.shape and pred.dtype == np.float32
    assert 0.0 <= pred.min() and pred.max() <= 1.0
    baseline = metrics.mae(np.full_like(tbright, bright.mean()), tbright)
    assert metrics.mae(pred, tbright) < 0.5 * baseline


def test_detector_round_trip(segmenter, shapes_data, tmp_path):
    _, (imgs, _, _) = shapes_data
    save_detector(segmenter, tmp_path / "seg")
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["detector.safetensors", "detector_config.json"]
    loaded = load_detector(tmp_path / "seg")
    assert loaded.config == segmenter.config
    a = segmenter(torch.from_numpy(imgs).permute(0, 3, 1, 2) * 2 - 1)
    b = loaded(torch.from_numpy(imgs).permute(0, 3, 1, 2) * 2 - 1)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError):
        load_detector(tmp_path / "nothing")


def test_detector_input_errors(segmenter):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predict(segmenter, np.full((1, 32, 32, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        predict(segmenter, torch.full((1, 3, 32, 32), 3.0))
    with pytest.raises(ValueError, match="task"):
        DetectorConfig(task="classify")


# --------------------------------------------------------------------------- fidelity glue


def test_condition_fidelity(segmenter, shapes_data):
    _, (imgs, labels, _) = shapes_data
    seg = condition_fidelity("segmentation", imgs, labels, {"segmentation": segmenter})
    assert set(seg) == {"miou", "pixel_acc"} and seg["miou"] > 0.75
    per = condition_scores("segmentation", imgs, labels, {"segmentation": segmenter})
    assert set(per) == set(seg) and all(v.shape == (len(imgs),) for v in per.values())
    assert {k: v.mean() for k, v in per.items()} == pytest.approx(seg)  # the mean is of the per-scan values
    # a blank "generation" carries no segmentation
    blank = condition_fidelity("segmentation", np.full_like(imgs, 0.1), labels, {"segmentation": segmenter})
    assert blank["miou"] < seg["miou"] - 0.3
    assert primary_fidelity("segmentation", seg) == seg["miou"]

    params = CannyParams(sigma=1.0)
    edges = detect_canny(imgs, params)
    c = condition_fidelity("canny", imgs, edges, canny=params)
    assert c["edge_f1"] == 1.0
    assert (condition_scores("canny", imgs, edges, canny=params)["edge_f1"] == 1.0).all()
    c_blank = condition_fidelity("canny", np.full_like(imgs, 0.1), edges, canny=params)
    assert c_blank["edge_f1"] == 0.0

    gray = lambda x: x.mean(-1)  # noqa: E731 — a derived condition with its own extractor
    g = condition_fidelity("grayscale", imgs, imgs.mean(-1), extractor=gray)
    assert g["ssim"] == pytest.approx(1.0)

    with pytest.raises(ValueError, match="needs a trained detector"):
        condition_fidelity("lighting", imgs, labels)
    with pytest.raises(ValueError, match="needs `canny"):
        condition_fidelity("canny", imgs, edges)
    with pytest.raises(ValueError, match="cannot score"):
        condition_fidelity("palette", imgs, imgs)
    assert set(PRIMARY_METRIC) >= {"segmentation", "lighting", "normal", "depth", "canny"}

    im = image_metrics(imgs, imgs)
    assert im == {"psnr": 100.0, "ssim": pytest.approx(1.0)}
    noisy = np.clip(imgs + 0.05 * np.random.default_rng(0).standard_normal(imgs.shape), 0, 1)
    per_im = image_scores(noisy, imgs)
    assert per_im["psnr"].shape == (len(imgs),) and image_metrics(noisy, imgs) == pytest.approx(
        {k: v.mean() for k, v in per_im.items()})
    assert image_metrics((imgs * 255).astype(np.uint8), imgs)["psnr"] > 40


def test_canny_params_match_the_condition_extractor(shapes_data):
    """detect_canny's defaults must reproduce the canny condition exactly, or canny fidelity
    would punish a perfect generation."""
    from ctrlora.data.conditions import canny_edges, grayscale01

    (imgs, _, _), _ = shapes_data
    u8 = (imgs[:8] * 255).round().astype(np.uint8)
    ours = detect_canny(u8, CannyParams())
    theirs = np.stack([canny_edges(grayscale01(p.astype(np.float32) / 255.0)) for p in u8]).astype(bool)
    assert ours.any()
    assert (ours == theirs).all()


def _layouts(x: np.ndarray) -> list[np.ndarray]:
    """The same values in other memory layouts: Fortran order, a strided view into a larger
    buffer, and a copy starting 4 bytes off the allocator's alignment."""
    fortran = np.asfortranarray(x)
    big = np.zeros((x.shape[0], x.shape[1] * 2, x.shape[2] * 2) + x.shape[3:], dtype=x.dtype)
    big[:, ::2, ::2] = x
    strided = big[:, ::2, ::2]
    raw = np.empty(x.nbytes + x.itemsize, dtype=np.uint8)
    shifted = np.frombuffer(raw.data, dtype=x.dtype, count=x.size, offset=x.itemsize).reshape(x.shape)
    shifted[...] = x
    return [fortran, strided, shifted]


def test_per_image_scores_do_not_depend_on_memory_layout():
    """Per-scan scores must be bit-identical for the same values in any layout (the means are
    exactly-rounded float64 sums), or two checkouts could write different per_scan.csv files."""
    rng = np.random.default_rng(11)
    a = rng.random((3, 40, 36, 3), dtype=np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), 0, 1).astype(np.float32)
    fns = {"ssim": lambda x, y: metrics.ssim_per_image(x, y, data_range=1.0),
           "ssim_gray": lambda x, y: metrics.ssim_per_image(x[..., 0], y[..., 0], data_range=1.0),
           "mae": metrics.mae_per_image,
           "psnr": lambda x, y: metrics.psnr_per_image(x, y, 1.0),
           "normals": metrics.normal_angular_error_per_image}
    want = {k: f(a, b) for k, f in fns.items()}
    for x, y in zip(_layouts(a), _layouts(b)):
        for k, f in fns.items():
            got = f(x, y)
            assert got.tobytes() == want[k].tobytes(), k
    # the single-image forms agree with the stacks bit for bit, also with a transposed channel axis
    chw_a, chw_b = np.moveaxis(a[0], -1, 0), np.moveaxis(b[0], -1, 0)
    assert metrics.ssim(chw_a, chw_b, data_range=1.0, channel_axis=0) == want["ssim"][0]
    assert metrics.mae(a[0].T, b[0].T) == want["mae"][0]
