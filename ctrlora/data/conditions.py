"""The condition registry: how each condition type turns a scan into the 3-channel image the VAE
sees (float32 H×W×3 in [0, 1]).

Rendered conditions read the maps the renderer wrote; derived conditions are computed from the
photograph alone, so any folder of real photographs gains them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ctrlora.data.labels import color_lut
from ctrlora.data.scan import Scan

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


@dataclass(frozen=True)
class ConditionType:
    name: str
    source: str  # "rendered" | "derived"
    description: str
    _encode: Callable[[Scan], np.ndarray]

    def encode(self, scan: Scan) -> np.ndarray:
        out = self._encode(scan)
        if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.float32:
            raise AssertionError(f"condition {self.name}: encoder returned {out.dtype} {out.shape}")
        return out


def _gray3(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.repeat(x[..., None], 3, axis=2)


def _photo01(scan: Scan) -> np.ndarray:
    photo = scan.require("photo")
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"scan {scan.scan_id}: photo must be H×W×3 uint8, got {photo.dtype} {photo.shape}")
    return photo.astype(np.float32) / 255.0


def grayscale01(photo01: np.ndarray) -> np.ndarray:
    return photo01 @ LUMA


# ---------------------------------------------------------------------------- rendered

def encode_segmentation(scan: Scan) -> np.ndarray:
    return color_lut()[scan.require("segmentation")].astype(np.float32) / 255.0


def encode_lighting(scan: Scan) -> np.ndarray:
    return _gray3(scan.require("lighting") / np.float32(255.0))


def encode_normal(scan: Scan) -> np.ndarray:
    return scan.require("normal").astype(np.float32) / 255.0


def encode_depth(scan: Scan) -> np.ndarray:
    return _gray3(scan.require("depth") / np.float32(255.0))


# ----------------------------------------------------------------------------- derived

CANNY_SIGMA = 1.0
BLUR_SIGMA = 2.0
PALETTE_COLORS = 8


def canny_edges(gray01: np.ndarray, sigma: float = CANNY_SIGMA) -> np.ndarray:
    """Binary edge map (float32 0/1) of a grayscale image in [0, 1] (skimage Canny with
    thresholds relative to the image's gradient range, so it adapts to exposure)."""
    from skimage.feature import canny

    return canny(gray01.astype(np.float64), sigma=sigma, low_threshold=0.1, high_threshold=0.2,
                 use_quantiles=False).astype(np.float32)


def encode_canny(scan: Scan) -> np.ndarray:
    return _gray3(canny_edges(grayscale01(_photo01(scan))))


def encode_grayscale(scan: Scan) -> np.ndarray:
    return _gray3(np.clip(grayscale01(_photo01(scan)), 0.0, 1.0))


def gaussian_blur(image01: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Low-pass filter. Mirror boundary (``reflect``): no dark border, and the mean is kept."""
    from skimage.filters import gaussian

    return gaussian(image01.astype(np.float32), sigma=sigma, mode="reflect", truncate=4.0,
                    channel_axis=-1 if image01.ndim == 3 else None, preserve_range=True).astype(np.float32)


def encode_blur(scan: Scan) -> np.ndarray:
    return np.clip(gaussian_blur(_photo01(scan)), 0.0, 1.0).astype(np.float32)


def quantise_palette(photo_u8: np.ndarray, colors: int = PALETTE_COLORS) -> np.ndarray:
    """Median-cut colour quantisation without dithering; an image with at most ``colors``
    distinct colours is returned unchanged."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(photo_u8), mode="RGB")
    q = im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return np.asarray(q.convert("RGB"))


def encode_palette(scan: Scan) -> np.ndarray:
    _photo01(scan)  # shape/dtype check
    return quantise_palette(scan.photo).astype(np.float32) / 255.0


CONDITIONS: dict[str, ConditionType] = {
    c.name: c
    for c in [
        ConditionType("segmentation", "rendered", "label map, colour-coded by the label table", encode_segmentation),
        ConditionType("lighting", "rendered", "shading max(0, n·l) with neutral albedo, gray", encode_lighting),
        ConditionType("normal", "rendered", "camera-space normals, (n + 1) / 2", encode_normal),
        ConditionType("depth", "rendered", "depth, 1 = nearest, 0 = background, gray", encode_depth),
        ConditionType("canny", "derived", f"Canny edges of the photo's luma (sigma {CANNY_SIGMA})", encode_canny),
        ConditionType("grayscale", "derived", "BT.601 luma of the photo", encode_grayscale),
        ConditionType("blur", "derived", f"Gaussian low-pass of the photo (sigma {BLUR_SIGMA} px)", encode_blur),
        ConditionType("palette", "derived", f"median-cut quantisation to {PALETTE_COLORS} colours", encode_palette),
    ]
}


def get_condition(name: str) -> ConditionType:
    try:
        return CONDITIONS[name]
    except KeyError:
        raise KeyError(f"unknown condition {name!r}; known: {', '.join(CONDITIONS)}") from None


def encode_u8(condition: str, scan: Scan) -> np.ndarray:
    """The condition image as RGB uint8, as stored under ``data/prepared/conditions/<c>/``."""
    return np.clip(np.round(get_condition(condition).encode(scan) * 255.0), 0, 255).astype(np.uint8)
