"""Condition fidelity and image metrics for generated images.

Fidelity re-detects the condition from each generated image and compares it with the condition
that was fed in:

| condition | re-detection | metrics (primary marked *) |
|---|---|---|
| segmentation | trained segmenter | ``miou``\\*, ``pixel_acc`` |
| lighting, depth | trained regressor (1 channel) | ``ssim``\\*, ``mae`` |
| normal | trained regressor (3 channels) | ``ssim``\\*, ``mae``, ``angular_error_deg`` |
| canny | skimage canny, the condition's own parameters | ``edge_f1``\\*, ``edge_precision``, ``edge_recall`` |
| any other derived condition | its extractor, passed in | ``ssim``\\*, ``mae`` |

Every primary metric is "higher is better" and lies in [0, 1] (SSIM can dip below 0 in theory).

:func:`condition_scores` returns one value per scan (image-level mIoU, SSIM, edge F1, …) so
comparisons can carry paired bootstrap intervals; :func:`condition_fidelity` returns their means.
mIoU and edge F1 are image-averaged (each scan weighs the same), not pooled over the stack.

Inputs (numpy, one row per example):
* ``generated`` / ``ground_truth`` images: ``N×H×W×3``, uint8 or float in [0, 1];
* segmentation data: integer label maps ``N×H×W`` (the raw ``segmentation.png`` labels);
* lighting / depth data: ``N×H×W`` (or ``N×H×W×1``, or the encoded ``N×H×W×3`` gray image),
  uint8 or float in [0, 1];
* normal data: ``N×H×W×3`` RGB (n + 1) / 2, uint8 or float in [0, 1];
* canny data: edge maps ``N×H×W`` (bool / 0-1) or the encoded ``N×H×W×3`` image (white = edge);
* derived data (with ``extractor``): whatever ``extractor(generated)`` returns, same shape.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ctrlora.data.conditions import TableView, get_condition
from ctrlora.data.labels import num_classes

from . import metrics as M
from .detectors import CannyParams, DetectorConfig, detect_canny, predict

__all__ = [
    "PRIMARY_METRIC",
    "DETECTED_CONDITIONS",
    "default_detector_config",
    "condition_scores",
    "condition_fidelity",
    "primary_fidelity",
    "image_scores",
    "image_metrics",
]

# One "higher is better" scalar per condition: the quality bar and the promotion gate read it.
# Both mappings are views of the condition table (params.yaml ``conditions``: metric, detector).
PRIMARY_METRIC: Mapping[str, str] = TableView(lambda t: {n: c.metric for n, c in t.items()})

# Conditions read back by a trained detector, and the detector's output channels (a segmenter's:
# the label table's max id + 1, so a stored label id is its class index with no mapping to keep).
DETECTED_CONDITIONS: Mapping[str, tuple[str, int]] = TableView(
    lambda t: {n: ("segmentation", num_classes()) if c.detector == "segmentation" else ("regression", c.channels)
               for n, c in t.items() if c.detector != "none"})


def default_detector_config(condition: str, **overrides) -> DetectorConfig:
    """The detector configuration used for ``condition`` (fields can be overridden)."""
    if condition not in DETECTED_CONDITIONS:
        raise ValueError(
            f"no trained detector for condition {condition!r}; detected conditions: {sorted(DETECTED_CONDITIONS)}"
        )
    task, channels = DETECTED_CONDITIONS[condition]
    return DetectorConfig(**{"task": task, "channels": channels, "condition": condition, **overrides})


def _images01(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{what} must be N×H×W×3 (uint8 or float in [0, 1]), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"{what} must lie in [0, 1] (or be uint8), got [{lo:.3g}, {hi:.3g}]")
    return np.clip(a, 0.0, 1.0)


def _map01(x: np.ndarray, n: int, hw: tuple[int, int], channels: int, what: str) -> np.ndarray:
    """Dense condition map → float32 in [0, 1]: N×H×W for one channel, N×H×W×3 for three."""
    a = np.asarray(x)
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    if channels == 1:
        if a.ndim == 4 and a.shape[-1] in (1, 3):
            a = a.mean(-1)
        if a.shape != (n, *hw):
            raise ValueError(f"{what} must be N×H×W = {(n, *hw)} (or N×H×W×1/3), got {np.asarray(x).shape}")
    elif a.shape != (n, *hw, channels):
        raise ValueError(f"{what} must be N×H×W×{channels} = {(n, *hw, channels)}, got {a.shape}")
    lo, hi = float(a.min()), float(a.max())
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"{what} must lie in [0, 1] (or be uint8), got [{lo:.3g}, {hi:.3g}]")
    return np.clip(a, 0.0, 1.0)


def _edges(x: np.ndarray, n: int, hw: tuple[int, int]) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[-1] in (1, 3):
        a = a[..., 0]
        a = a > (127 if a.dtype == np.uint8 else 0.5)
    if a.shape != (n, *hw):
        raise ValueError(f"canny data must be N×H×W (or the encoded N×H×W×3), got {np.asarray(x).shape}")
    return a.astype(bool)


def _detector_for(name: str, detectors: Mapping[str, object] | None):
    if detectors is None or name not in detectors:
        raise ValueError(f"condition {name!r} needs a trained detector in `detectors[{name!r}]`")
    det = detectors[name]
    task, channels = DETECTED_CONDITIONS[name]
    # a segmenter's class count is its own (the default: the label table's, max id + 1)
    if det.config.task != task or (task == "regression" and det.config.channels != channels):
        raise ValueError(
            f"detector for {name!r} is a {det.config.task} model with {det.config.channels} channels; "
            f"expected {task} with {channels}"
        )
    return det


def _detected_scores(name: str, gen: np.ndarray, data: np.ndarray, detectors, normal_mask) -> dict[str, np.ndarray]:
    det = _detector_for(name, detectors)
    task, channels = DETECTED_CONDITIONS[name]
    n, h, w = gen.shape[:3]
    pred = predict(det, gen)
    if task == "segmentation":
        true = np.asarray(data)
        if true.shape != (n, h, w) or not np.issubdtype(true.dtype, np.integer):
            raise ValueError(
                f"segmentation data must be integer label maps N×H×W = {(n, h, w)}, got {true.dtype} {true.shape}"
            )
        return {"miou": M.miou_per_image(pred, true, det.config.channels),
                "pixel_acc": (pred == true).reshape(n, -1).mean(axis=1)}
    true = _map01(data, n, (h, w), channels, f"{name} data")
    out = {"ssim": M.ssim_per_image(pred, true, data_range=1.0), "mae": M.mae_per_image(pred, true)}
    if name == "normal":
        mask = None if normal_mask is None else np.asarray(normal_mask, bool)
        out["angular_error_deg"] = M.normal_angular_error_per_image(pred, true, mask)
    return out


def condition_scores(
    condition_name: str,
    generated_images: np.ndarray,
    input_condition_data: np.ndarray,
    detectors: Mapping[str, object] | None = None,
    *,
    canny: CannyParams | None = None,
    extractor: Callable[[np.ndarray], np.ndarray] | None = None,
    edge_tolerance_px: int = 1,
    normal_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-scan fidelity of ``generated_images`` to ``input_condition_data`` (see module doc):
    ``{metric: float64 array [N]}``, one value per image, including
    ``PRIMARY_METRIC[condition_name]``.

    ``detectors`` maps condition names to trained detectors (:func:`~.detectors.train_detector`
    or :func:`~.detectors.load_detector`); needed for segmentation, lighting, depth and normal.
    ``canny`` holds the canny condition's extractor parameters (required for ``"canny"``).
    ``extractor`` re-extracts any other derived condition from ``N×H×W×3`` images in [0, 1].
    ``normal_mask`` (``N×H×W`` bool) restricts the normal angular error to those pixels (e.g.
    the foreground); by default pixels whose input normal is the zero vector are left out (an
    image with no such pixel gets NaN angular error).
    """
    gen = _images01(generated_images, "generated_images")
    n, h, w = gen.shape[:3]
    name = condition_name
    if name in DETECTED_CONDITIONS:
        return _detected_scores(name, gen, input_condition_data, detectors, normal_mask)
    if name in PRIMARY_METRIC and get_condition(name).op == "canny":
        if canny is None:
            raise ValueError(f"condition {name!r} needs `canny=CannyParams(...)` matching its extractor")
        s = M.edge_scores_per_image(detect_canny(gen, canny), _edges(input_condition_data, n, (h, w)),
                                    edge_tolerance_px)
        return {"edge_f1": s["f1"], "edge_precision": s["precision"], "edge_recall": s["recall"]}
    if extractor is not None:
        pred = np.asarray(extractor(gen), dtype=np.float32)
        true = np.asarray(input_condition_data)
        true = true.astype(np.float32) / 255.0 if true.dtype == np.uint8 else true.astype(np.float32)
        if pred.shape != true.shape or pred.shape[0] != n:
            raise ValueError(f"{name}: extractor output {pred.shape} does not match the data {true.shape}")
        return {"ssim": M.ssim_per_image(pred, true, data_range=1.0), "mae": M.mae_per_image(pred, true)}
    raise ValueError(
        f"cannot score condition {name!r}: it is neither detected ({sorted(DETECTED_CONDITIONS)}) nor "
        "canny, and no `extractor` was given"
    )


def condition_fidelity(condition_name: str, generated_images: np.ndarray, input_condition_data: np.ndarray,
                       detectors: Mapping[str, object] | None = None, **kwargs) -> dict[str, float]:
    """Mean over scans of :func:`condition_scores` (same arguments): ``{metric: float}``.

    Every figure is image-averaged (the mean of the per-scan values, NaN scans left out), so it
    equals the mean the bootstrap intervals are built on. For a data-set-level (pooled) mIoU use
    :func:`~.metrics.miou` on the stacked predictions.
    """
    per = condition_scores(condition_name, generated_images, input_condition_data, detectors, **kwargs)
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in per.items()}


def primary_fidelity(condition_name: str, scores: Mapping[str, float]) -> float:
    """The primary scalar of a :func:`condition_fidelity` result."""
    if condition_name not in PRIMARY_METRIC:
        raise ValueError(f"no primary metric for condition {condition_name!r}")
    return float(scores[PRIMARY_METRIC[condition_name]])


def image_scores(generated: np.ndarray, ground_truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB, capped at 100) and SSIM of generated images against the ground-truth
    photographs, both ``N×H×W×3`` uint8 or float in [0, 1] → ``{"psnr", "ssim"}`` arrays ``[N]``."""
    g = _images01(generated, "generated")
    t = _images01(ground_truth, "ground_truth")
    if g.shape != t.shape:
        raise ValueError(f"image_metrics: shape mismatch, got {g.shape} and {t.shape}")
    return {"psnr": M.psnr_per_image(g, t, data_range=1.0), "ssim": M.ssim_per_image(g, t, data_range=1.0)}


def image_metrics(generated: np.ndarray, ground_truth: np.ndarray) -> dict[str, float]:
    """Means of :func:`image_scores`: ``{"psnr", "ssim"}``."""
    return {k: float(v.mean()) for k, v in image_scores(generated, ground_truth).items()}
