"""Scoring phase of the evaluation: per-scan fidelity of generated images to the conditions of
an :class:`~.loading.EvalData`, and per-scan image metrics against its photographs.

Per-scan arrays (one value per scan, in the data's scan order) are what the paired bootstrap of
:mod:`.stats` resamples; every mean reported is the mean of such an array.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

import numpy as np

from .detectors import CannyParams
from .fidelity import PRIMARY_METRIC, condition_scores, image_scores
from .loading import EvalData, fidelity_truth

__all__ = ["derived_extractor", "canny_params", "scan_scores", "per_scan_fidelity", "per_scan_image_scores", "means"]


def derived_extractor(condition: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Re-extractor of a derived condition from ``N×H×W×3`` images in [0, 1] (its table entry's
    op and parameters, :meth:`~ctrlora.data.conditions.ConditionType.extractor`), or ``None`` for
    conditions that are not derived-with-extractor (unknown names included)."""
    from ctrlora.data.conditions import CONDITIONS

    return CONDITIONS[condition].extractor() if condition in CONDITIONS else None


def canny_params(condition: str, canny: CannyParams | None = None) -> CannyParams:
    """``canny`` (default :class:`CannyParams`) with the sigma of ``condition``'s table entry
    when that is a canny op: the edges are re-detected as the condition extracted them."""
    from ctrlora.data.conditions import CONDITIONS

    canny = canny or CannyParams()
    c = CONDITIONS.get(condition)
    return replace(canny, sigma=c.op_params["sigma"]) if c is not None and c.op == "canny" else canny


def scan_scores(condition: str, generated: np.ndarray, data: EvalData, detectors: Mapping[str, Any],
                canny: CannyParams | None = None) -> dict[str, np.ndarray]:
    """Every fidelity metric of ``condition`` per scan: ``{metric: float64 [N]}`` (see
    :func:`~.fidelity.condition_scores`), generated scan ``i`` against data scan ``i``."""
    if len(generated) != len(data):
        raise ValueError(f"{len(generated)} generated images for {len(data)} scans")
    return condition_scores(condition, generated, fidelity_truth(condition, data), detectors,
                            canny=canny_params(condition, canny), extractor=derived_extractor(condition))


def per_scan_fidelity(condition: str, generated: np.ndarray, data: EvalData, detectors: Mapping[str, Any],
                      canny: CannyParams | None = None) -> np.ndarray:
    """The primary fidelity metric of ``condition`` (``PRIMARY_METRIC``: image-level mIoU, SSIM,
    edge F1) per scan: float64 ``[N]``, higher is better."""
    return scan_scores(condition, generated, data, detectors, canny)[PRIMARY_METRIC[condition]]


def per_scan_image_scores(generated: np.ndarray, data: EvalData) -> dict[str, np.ndarray]:
    """``{"image_psnr", "image_ssim"}`` per scan against the ground-truth photographs."""
    return {f"image_{k}": v for k, v in image_scores(generated, data.photos).items()}


def means(per_scan: Mapping[str, np.ndarray], digits: int = 6) -> dict[str, float]:
    """``{metric: mean over scans}`` (NaN scans left out; all-NaN → NaN), rounded."""
    return {k: round(float(np.nanmean(v)), digits) if np.isfinite(v).any() else float("nan")
            for k, v in per_scan.items()}
