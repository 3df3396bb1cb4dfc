"""Metric functions on numpy arrays.

Every function here is pure: it takes arrays, checks their shapes, and returns plain Python
floats (or a small dict of floats). Nothing reads files or touches torch.

Conventions
-----------
* Label maps are integer arrays of any shape (``H×W`` or a stack ``N×H×W``); counts are pooled
  over every pixel given, so a stack is scored as one big image (the usual data-set-level mIoU).
* Edge maps are boolean (or 0/1) arrays ``H×W`` or ``N×H×W``; the distance tolerance never
  crosses from one image of a stack into the next.
* Images for PSNR / SSIM are ``H×W`` (gray) or ``H×W×C`` (channel last); stacks go through
  :func:`mean_ssim` / :func:`mean_psnr`, which score image by image and average.
* Normal maps are encoded as in ``normal.png``: RGB in [0, 1] holding (n + 1) / 2.
* ``*_per_image`` functions take stacks ``N×…`` and return a float64 array ``[N]``, one score per
  image, for paired bootstrap intervals over images (:mod:`.stats`). Their mean is the
  image-averaged figure; for mIoU and edge F1 it differs from the pooled stack figure of
  :func:`miou` / :func:`edge_scores` (pooling weights images by their pixel / edge counts).
* Means over pixels (MAE, RMSE, PSNR's MSE, SSIM's map, the normals' angles) are taken in float64
  with :func:`math.fsum` on a C-contiguous copy: the sum is exactly rounded, so a score does not
  depend on the order NumPy would reduce in, which follows the array's memory layout (a
  transposed or sliced view, a channel taken out of ``H×W×C``). Two checkouts, or a view and its
  copy, then score bit-identically.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "confusion_matrix",
    "miou",
    "miou_per_image",
    "per_class_iou",
    "pixel_accuracy",
    "edge_scores",
    "edge_f1",
    "edge_scores_per_image",
    "psnr",
    "mean_psnr",
    "psnr_per_image",
    "ssim",
    "mean_ssim",
    "ssim_per_image",
    "mae",
    "mae_per_image",
    "rmse",
    "normal_angular_error",
    "normal_angular_error_per_image",
]


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shape mismatch, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"{what}: empty arrays")


def _mean64(x: np.ndarray) -> float:
    """Mean of every element, float64, exactly-rounded sum (independent of layout and order)."""
    v = np.ascontiguousarray(x, dtype=np.float64).ravel()
    return math.fsum(v.tolist()) / v.size


def _stacks(a: np.ndarray, b: np.ndarray, what: str, min_ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    _check_same_shape(a, b, what)
    if a.ndim < min_ndim:
        raise ValueError(f"{what}: expected a stack of images (N×…, {min_ndim}+ dims), got shape {a.shape}")
    return a, b


# --------------------------------------------------------------------------- segmentation


def confusion_matrix(pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``num_classes × num_classes`` pixel counts, rows = true class, columns = predicted class.

    Raises ``ValueError`` on shape mismatch, non-integer input or labels outside
    ``[0, num_classes)``.
    """
    pred = np.asarray(pred_labels)
    true = np.asarray(true_labels)
    _check_same_shape(pred, true, "confusion_matrix")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, arr in (("pred_labels", pred), ("true_labels", true)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} has labels in [{lo}, {hi}], outside [0, {num_classes})")
    flat = true.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_iou(pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """IoU of every class (float array of length ``num_classes``); NaN where a class is absent
    from both maps (its IoU is undefined)."""
    cm = confusion_matrix(pred_labels, true_labels, num_classes)
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def miou(pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int, ignore_absent: bool = True) -> float:
    """Mean intersection-over-union.

    With ``ignore_absent=True`` (default) the mean runs over the classes present in either map
    (a class that appears in neither says nothing about the prediction). With
    ``ignore_absent=False`` the mean runs over all ``num_classes`` and a class absent from both
    counts as a perfect 1.0.
    """
    iou = per_class_iou(pred_labels, true_labels, num_classes)
    if ignore_absent:
        present = ~np.isnan(iou)
        return float(iou[present].mean())  # at least one class is present in a non-empty map
    return float(np.where(np.isnan(iou), 1.0, iou).mean())


def miou_per_image(pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int,
                   ignore_absent: bool = True) -> np.ndarray:
    """:func:`miou` of each image of two ``N×H×W`` label stacks (classes present in that image)."""
    pred, true = _stacks(pred_labels, true_labels, "miou_per_image")
    return np.array([miou(p, t, num_classes, ignore_absent) for p, t in zip(pred, true)], dtype=np.float64)


def pixel_accuracy(pred_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Fraction of pixels whose predicted label equals the true label."""
    pred = np.asarray(pred_labels)
    true = np.asarray(true_labels)
    _check_same_shape(pred, true, "pixel_accuracy")
    return float((pred == true).mean())


# --------------------------------------------------------------------------- edges


def _tolerance_structure(ndim: int, tolerance_px: int) -> np.ndarray:
    """A (2t+1)×(2t+1) square footprint (chessboard distance <= t), of size 1 along any leading
    batch axes so dilation stays inside each image."""
    side = 2 * tolerance_px + 1
    return np.ones((1,) * (ndim - 2) + (side, side), dtype=bool)


def edge_scores(pred_edges: np.ndarray, true_edges: np.ndarray, tolerance_px: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of an edge map against a reference edge map.

    A predicted edge pixel counts as correct when a reference edge pixel lies within
    ``tolerance_px`` (chessboard distance, i.e. the 8-neighbourhood for 1 px); a reference edge
    pixel counts as recovered when a predicted edge pixel lies within the same distance.
    Counts are pooled over a stack. Both maps empty → precision = recall = F1 = 1; exactly one
    empty → the undefined ratio is 0.
    """
    pred = np.asarray(pred_edges)
    true = np.asarray(true_edges)
    _check_same_shape(pred, true, "edge_scores")
    if pred.ndim < 2:
        raise ValueError(f"edge maps must be H×W or N×H×W, got shape {pred.shape}")
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    pred = pred.astype(bool)
    true = true.astype(bool)
    n_pred, n_true = int(pred.sum()), int(true.sum())
    if n_pred == 0 and n_true == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if tolerance_px > 0:
        st = _tolerance_structure(pred.ndim, tolerance_px)
        true_zone = ndimage.binary_dilation(true, structure=st)
        pred_zone = ndimage.binary_dilation(pred, structure=st)
    else:
        true_zone, pred_zone = true, pred
    precision = float((pred & true_zone).sum() / n_pred) if n_pred else 0.0
    recall = float((true & pred_zone).sum() / n_true) if n_true else 0.0
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": float(f1)}


def edge_scores_per_image(pred_edges: np.ndarray, true_edges: np.ndarray,
                          tolerance_px: int = 1) -> dict[str, np.ndarray]:
    """:func:`edge_scores` of each image of two ``N×H×W`` edge stacks: ``{"precision", "recall",
    "f1"}`` → arrays ``[N]``."""
    pred, true = _stacks(pred_edges, true_edges, "edge_scores_per_image")
    rows = [edge_scores(p, t, tolerance_px) for p, t in zip(pred, true)]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in ("precision", "recall", "f1")}


def edge_f1(pred_edges: np.ndarray, true_edges: np.ndarray, tolerance_px: int = 1) -> float:
    """F1 of :func:`edge_scores` (harmonic mean of tolerant precision and recall)."""
    return edge_scores(pred_edges, true_edges, tolerance_px)["f1"]


# --------------------------------------------------------------------------- images


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB over all elements: ``10·log10(range² / MSE)``.

    Identical inputs give ``math.inf``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b, "psnr")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = _mean64((a - b) ** 2)
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def mean_psnr(a: np.ndarray, b: np.ndarray, data_range: float, max_db: float | None = 100.0) -> float:
    """PSNR image by image over the leading axis of two stacks, averaged. Each image's value is
    capped at ``max_db`` (so one exact copy does not turn the mean into ``inf``); pass
    ``max_db=None`` to keep ``inf``."""
    return float(np.mean(psnr_per_image(a, b, data_range, max_db)))


def psnr_per_image(a: np.ndarray, b: np.ndarray, data_range: float, max_db: float | None = 100.0) -> np.ndarray:
    """PSNR of each image of two stacks (capped at ``max_db`` as in :func:`mean_psnr`)."""
    a, b = _stacks(a, b, "psnr_per_image", min_ndim=2)
    vals = np.array([psnr(x, y, data_range) for x, y in zip(a, b)], dtype=np.float64)
    return vals if max_db is None else np.minimum(vals, max_db)


def _infer_data_range(a: np.ndarray, b: np.ndarray) -> float:
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        return 255.0
    lo = min(float(a.min()), float(b.min()))
    hi = max(float(a.max()), float(b.max()))
    if lo >= 0.0 and hi <= 1.0:
        return 1.0
    raise ValueError(
        f"cannot infer data_range for values in [{lo:.3g}, {hi:.3g}]; pass data_range explicitly"
    )


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float | None = None,
    channel_axis: int | None = None,
    win_size: int | None = None,
) -> float:
    """Structural similarity of two single images (Wang et al.: Gaussian window, σ = 1.5).

    * 2-D inputs are gray images.
    * 3-D inputs need a channel axis: pass ``channel_axis``, or leave it ``None`` for a channel-
      last image with 1, 3 or 4 channels. For a stack of images use :func:`mean_ssim`.
    * ``data_range`` defaults to 255 for two uint8 images and to 1 for float images inside
      [0, 1]; anything else must say it.
    * ``win_size`` defaults to 11 (the Gaussian's support), shrunk to the largest odd size that
      fits the smaller side, so 64-px and even 8-px images work. Images under 3 px raise.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    _check_same_shape(a, b, "ssim")
    if a.ndim == 2:
        if channel_axis is not None:
            raise ValueError("ssim: 2-D images have no channel axis")
        spatial = a.shape
    elif a.ndim == 3:
        if channel_axis is None:
            if a.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"ssim: cannot tell the channel axis of shape {a.shape}; pass channel_axis "
                    "(or use mean_ssim for a stack of gray images)"
                )
            channel_axis = -1
        spatial = tuple(s for i, s in enumerate(a.shape) if i != channel_axis % 3)
    else:
        raise ValueError(f"ssim: expected a 2-D or 3-D image, got shape {a.shape}")
    if data_range is None:
        data_range = _infer_data_range(a, b)
    side = min(spatial)
    if side < 3:
        raise ValueError(f"ssim: images of {spatial} px are too small (need >= 3 px per side)")
    if win_size is None:
        win_size = min(11, side if side % 2 else side - 1)
    # channels first, each a C-contiguous float64 plane, so the filters and the map's mean see the
    # same layout whatever the caller's strides; the mean over channels runs in channel order
    if a.ndim == 2 or channel_axis is None:  # (a 3-D image always has its axis by now)
        a, b = a[None], b[None]
    else:
        a, b = np.moveaxis(a, channel_axis, 0), np.moveaxis(b, channel_axis, 0)
    per_channel = [_ssim_plane(np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64),
                               float(data_range), win_size) for x, y in zip(a, b)]
    return math.fsum(per_channel) / len(per_channel)


def _ssim_plane(a: np.ndarray, b: np.ndarray, data_range: float, win_size: int) -> float:
    """SSIM of two 2-D float64 planes: scikit-image's map (Gaussian σ = 1.5, population
    covariance), averaged inside the filter-radius border as scikit-image does, but with
    :func:`_mean64` instead of its layout-dependent ``mean``."""
    from skimage.metrics import structural_similarity

    _, smap = structural_similarity(a, b, data_range=data_range, win_size=win_size, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, full=True)
    pad = (win_size - 1) // 2
    return _mean64(smap[pad:smap.shape[0] - pad, pad:smap.shape[1] - pad])


def mean_ssim(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float | None = None,
    channel_axis: int | None = None,
    win_size: int | None = None,
) -> float:
    """:func:`ssim` image by image over the leading axis of two stacks (``N×H×W`` or
    ``N×H×W×C``), averaged. ``channel_axis`` refers to the axes of one image."""
    return float(np.mean(ssim_per_image(a, b, data_range, channel_axis, win_size)))


def ssim_per_image(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float | None = None,
    channel_axis: int | None = None,
    win_size: int | None = None,
) -> np.ndarray:
    """:func:`ssim` of each image of two stacks (``N×H×W`` or ``N×H×W×C``) → array ``[N]``."""
    a = np.asarray(a)
    b = np.asarray(b)
    _check_same_shape(a, b, "ssim_per_image")
    if a.ndim not in (3, 4):
        raise ValueError(f"ssim_per_image: expected a stack N×H×W or N×H×W×C, got shape {a.shape}")
    if data_range is None:
        data_range = _infer_data_range(a, b)
    return np.array([ssim(x, y, data_range, channel_axis, win_size) for x, y in zip(a, b)], dtype=np.float64)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute error over all elements."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b, "mae")
    return _mean64(np.abs(a - b))


def mae_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute error of each image of two stacks → array ``[N]``."""
    a, b = _stacks(a, b, "mae_per_image", min_ndim=2)
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return np.array([_mean64(x) for x in d], dtype=np.float64)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean squared error over all elements."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b, "rmse")
    return math.sqrt(_mean64((a - b) ** 2))


# --------------------------------------------------------------------------- normals


def normal_angular_error(
    pred_rgb01: np.ndarray, true_rgb01: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Mean angle in degrees between two normal maps encoded as RGB (n + 1) / 2 in [0, 1].

    Inputs are ``...×H×W×3`` (channel last). Vectors are decoded with ``2·rgb − 1`` and
    renormalised (8-bit quantisation leaves them slightly off unit length). ``mask`` (shape
    ``...×H×W``, boolean) selects the pixels to average — typically the foreground; ``None``
    means every pixel whose true vector is not (near) zero. Raises if the mask selects nothing.
    """
    p = np.asarray(pred_rgb01, dtype=np.float64)
    t = np.asarray(true_rgb01, dtype=np.float64)
    _check_same_shape(p, t, "normal_angular_error")
    if p.shape[-1] != 3:
        raise ValueError(f"normal maps must be channel-last RGB (…×H×W×3), got shape {p.shape}")
    p = 2.0 * p - 1.0
    t = 2.0 * t - 1.0
    pn = np.linalg.norm(p, axis=-1)
    tn = np.linalg.norm(t, axis=-1)
    if mask is None:
        sel = tn > 1e-3
    else:
        sel = np.asarray(mask).astype(bool)
        if sel.shape != p.shape[:-1]:
            raise ValueError(f"mask shape {sel.shape} does not match the maps' pixels {p.shape[:-1]}")
    if not sel.any():
        raise ValueError("normal_angular_error: the mask selects no pixels")
    cos = (p * t).sum(-1) / np.maximum(pn * tn, 1e-12)
    ang = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return _mean64(ang[sel])


def normal_angular_error_per_image(
    pred_rgb01: np.ndarray, true_rgb01: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """:func:`normal_angular_error` of each image of two ``N×H×W×3`` stacks → array ``[N]``;
    NaN for an image where the mask (or the non-zero true normals) selects no pixel."""
    p, t = _stacks(pred_rgb01, true_rgb01, "normal_angular_error_per_image", min_ndim=4)
    masks = [None] * len(p) if mask is None else np.asarray(mask).astype(bool)
    if mask is not None and masks.shape != p.shape[:-1]:
        raise ValueError(f"mask shape {masks.shape} does not match the maps' pixels {p.shape[:-1]}")
    out = np.full(len(p), np.nan)
    for i, (a, b, m) in enumerate(zip(p, t, masks)):
        sel = (np.linalg.norm(2.0 * np.asarray(b, np.float64) - 1.0, axis=-1) > 1e-3) if m is None else m
        if sel.any():
            out[i] = normal_angular_error(a, b, sel)
    return out
