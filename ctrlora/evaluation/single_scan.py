"""Scores of a few generated images against ONE prepared scan: the interactive counterpart of
the evaluation's scoring phase (same metrics, same re-detectors, same extractors).

* :func:`scan_truth` reads a scan's ground truth: its prepared photograph and, per condition,
  what a re-detection is compared with (the raw label map for segmentation, else the prepared
  condition image).
* :func:`score_images` scores every generated image: PSNR / SSIM against the photograph and,
  for each condition whose map came from this scan, the condition's primary fidelity metric
  (:data:`~.fidelity.PRIMARY_METRIC`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ctrlora.data.conditions import get_condition
from ctrlora.data.files import read_png

from .detectors import CannyParams
from .fidelity import DETECTED_CONDITIONS, PRIMARY_METRIC, condition_scores, image_scores
from .scoring import canny_params, derived_extractor

__all__ = ["scan_truth", "score_images", "scorable"]


def scan_truth(prepared_root: str | Path, scan_id: str, conditions: Sequence[str],
               scan_sources: Sequence[str | Path] = ()) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(photo, {condition: truth})`` of prepared scan ``scan_id``: the photo as uint8
    ``H×W×3``; the truth of segmentation is the raw label map (looked up in ``scan_sources``,
    the folders ``prepare`` read), of any other condition its prepared image."""
    root = Path(prepared_root)
    photo_path = root / "photos" / f"{scan_id}.png"
    if not photo_path.is_file():
        raise FileNotFoundError(f"{photo_path}: no prepared photo for scan {scan_id!r}")
    truths = {}
    for c in conditions:
        if c == "segmentation":
            found = [Path(s) / scan_id / "segmentation.png" for s in scan_sources
                     if (Path(s) / scan_id / "segmentation.png").is_file()]
            if found:
                truths[c] = read_png(found[0], "L").astype(np.int64)
            continue
        p = root / "conditions" / c / f"{scan_id}.png"
        if p.is_file():
            truths[c] = read_png(p, "RGB")
    return read_png(photo_path, "RGB"), truths


def scorable(condition: str, detectors: Mapping[str, Any]) -> bool:
    """Whether :func:`score_images` can score ``condition`` (a detected condition needs its
    re-detector)."""
    if condition in DETECTED_CONDITIONS:
        return condition in detectors
    return condition in PRIMARY_METRIC and get_condition(condition).kind == "derived"


def score_images(generated: np.ndarray, photo: np.ndarray, truths: Mapping[str, np.ndarray],
                 detectors: Mapping[str, Any] | None = None,
                 canny: CannyParams | None = None) -> list[dict[str, float]]:
    """One dict per generated image (uint8 ``N×H×W×3``): ``psnr`` and ``ssim`` against
    ``photo``, and ``<condition>.<primary metric>`` for every condition of ``truths`` that
    :func:`scorable` allows. Truths and photo must have the generated images' size."""
    gen = np.asarray(generated)
    n = len(gen)
    detectors = dict(detectors or {})
    per: dict[str, np.ndarray] = dict(image_scores(gen, np.repeat(photo[None], n, axis=0)))
    for c, truth in truths.items():
        if not scorable(c, detectors):
            continue
        metric = PRIMARY_METRIC[c]
        scores = condition_scores(c, gen, np.repeat(np.asarray(truth)[None], n, axis=0), detectors,
                                  canny=canny_params(c, canny), extractor=derived_extractor(c))
        per[f"{c}.{metric}"] = scores[metric]
    return [{k: float(v[i]) for k, v in per.items()} for i in range(n)]
