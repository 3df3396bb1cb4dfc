"""The condition registry: how each condition type turns a scan into the 3-channel image the VAE
sees (float32 H×W×3 in [0, 1]), and how its fidelity is read back.

Every condition is declared once, in params.yaml ``conditions`` (docs/data.md, "Adding a
condition"); :class:`ConditionTable` checks that section and :data:`CONDITIONS` is the current
params file's table. Rendered conditions (label_map, continuous) read the maps the renderer wrote;
derived conditions are computed from the photograph alone, so any folder of real photographs
gains them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ctrlora.data.labels import color_lut
from ctrlora.data.scan import IMAGE_FILES, Scan

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


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


# ----------------------------------------------------------------------------- derived ops
# defaults of the functions; a condition's own parameters come from its table entry
CANNY_SIGMA = 1.0
BLUR_SIGMA = 2.0
PALETTE_COLORS = 8


def canny_edges(gray01: np.ndarray, sigma: float = CANNY_SIGMA) -> np.ndarray:
    """Binary edge map (float32 0/1) of a grayscale image in [0, 1] (skimage Canny with
    thresholds relative to the image's gradient range, so it adapts to exposure)."""
    from skimage.feature import canny

    return canny(gray01.astype(np.float64), sigma=sigma, low_threshold=0.1, high_threshold=0.2,
                 use_quantiles=False).astype(np.float32)


def gaussian_blur(image01: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Low-pass filter. Mirror boundary (``reflect``): no dark border, and the mean is kept."""
    from skimage.filters import gaussian

    return gaussian(image01.astype(np.float32), sigma=sigma, mode="reflect", truncate=4.0,
                    channel_axis=-1 if image01.ndim == 3 else None, preserve_range=True).astype(np.float32)


def quantise_palette(photo_u8: np.ndarray, colors: int = PALETTE_COLORS) -> np.ndarray:
    """Median-cut colour quantisation without dithering; an image with at most ``colors``
    distinct colours is returned unchanged."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(photo_u8), mode="RGB")
    q = im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return np.asarray(q.convert("RGB"))


# ------------------------------------------------------------------------------ the table
# params.yaml ``conditions`` declares every condition; the code below only knows the kinds, the ops
# and the scan maps, and checks each entry against them.

KINDS = ("label_map", "continuous", "derived")
METRICS = ("miou", "ssim", "edge_f1")
DETECTORS = ("segmentation", "regression", "none")
# derived op -> its parameters and their types (every one must be stated in the table)
OPS: dict[str, dict[str, type]] = {"canny": {"sigma": float}, "grayscale": {}, "blur": {"sigma": float},
                                   "palette": {"colors": int}}
# the maps a scan folder can carry (ctrlora.data.scan.IMAGE_FILES): a map condition reads the one of
# its own name; segmentation.png holds label ids, the others values
SCAN_MAPS: dict[str, tuple[str, int]] = {
    f[:-4]: ("label_map" if f == "segmentation.png" else "continuous", 3 if mode == "RGB" else 1)
    for f, mode in IMAGE_FILES.items() if f != "photo.png"
}
_COMMON_KEYS = ("kind", "metric", "detector", "description")
_KIND_KEYS = {"label_map": ("clinic",), "continuous": ("channels", "clinic"), "derived": ("op",)}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # a folder name, a DVC stage item, an MLflow model suffix


def _describe(kind: str, channels: int | None, op: str | None, params: Mapping[str, Any]) -> str:
    if kind == "label_map":
        return "label map, colour-coded by the label table"
    if kind == "continuous":
        return "scan map, gray" if channels == 1 else "scan map, RGB"
    return {"canny": "Canny edges of the photo's luma (sigma {sigma})", "grayscale": "BT.601 luma of the photo",
            "blur": "Gaussian low-pass of the photo (sigma {sigma} px)",
            "palette": "median-cut quantisation to {colors} colours"}[str(op)].format(**params)


@dataclass(frozen=True)
class ConditionType:
    """One entry of the condition table: how a scan becomes the image the VAE sees, and how its
    fidelity is read back."""

    name: str
    kind: str  # label_map | continuous | derived
    metric: str  # primary fidelity metric
    detector: str  # segmentation | regression | none
    channels: int | None = None  # continuous: 1 or 3
    op: str | None = None  # derived: a key of OPS
    params: tuple[tuple[str, Any], ...] = ()  # derived: the op's parameters
    clinic: str | None = None  # the clinic export folder of this map
    description: str = ""

    @property
    def source(self) -> str:
        """``rendered`` (needs a scan map) or ``derived`` (needs only the photograph)."""
        return "derived" if self.kind == "derived" else "rendered"

    @property
    def op_params(self) -> dict[str, Any]:
        return dict(self.params)

    def encode(self, scan: Scan) -> np.ndarray:
        out = self._encode(scan)
        if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.float32:
            raise AssertionError(f"condition {self.name}: encoder returned {out.dtype} {out.shape}")
        return out

    def _encode(self, scan: Scan) -> np.ndarray:
        p = self.op_params
        if self.kind == "label_map":
            return color_lut()[scan.require(self.name)].astype(np.float32) / 255.0
        if self.kind == "continuous":
            if self.channels == 1:
                return _gray3(scan.require(self.name) / np.float32(255.0))
            return scan.require(self.name).astype(np.float32) / 255.0
        if self.op == "canny":
            return _gray3(canny_edges(grayscale01(_photo01(scan)), sigma=p["sigma"]))
        if self.op == "grayscale":
            return _gray3(np.clip(grayscale01(_photo01(scan)), 0.0, 1.0))
        if self.op == "blur":
            return np.clip(gaussian_blur(_photo01(scan), sigma=p["sigma"]), 0.0, 1.0).astype(np.float32)
        _photo01(scan)  # palette; shape/dtype check
        return quantise_palette(scan.photo, colors=p["colors"]).astype(np.float32) / 255.0

    def extractor(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The op re-run on ``N×H×W×3`` generated images in [0, 1], for a derived condition
        scored by SSIM against its image; ``None`` otherwise (detected ones, and canny, which
        fidelity scores as edges)."""
        if self.kind != "derived" or self.op == "canny":
            return None
        p = self.op_params
        if self.op == "grayscale":
            return lambda g: np.repeat(np.clip(grayscale01(g), 0, 1)[..., None], 3, -1).astype(np.float32)
        if self.op == "blur":
            return lambda g: np.stack([np.clip(gaussian_blur(x, sigma=p["sigma"]), 0, 1) for x in g]
                                      ).astype(np.float32)
        return lambda g: np.stack([quantise_palette(np.round(x * 255).astype(np.uint8), colors=p["colors"])
                                   for x in g]).astype(np.float32) / 255.0


def _number(name: str, key: str, value: Any, typ: type) -> Any:
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 256:
            raise ValueError(f"condition {name!r}: {key} must be an integer in 2..256, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 64:
        raise ValueError(f"condition {name!r}: {key} must be a number in (0, 64], got {value!r}")
    return float(value)


def _entry(name: Any, raw: Any) -> ConditionType:
    """One table entry, checked: every key known, every value allowed, the parts consistent."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"condition name {name!r} must be lower-case letters, digits and _ (a folder and stage name)")
    if not isinstance(raw, Mapping):
        raise ValueError(f"condition {name!r}: expected a mapping of keys, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ValueError(f"condition {name!r}: key 'kind' must be one of {list(KINDS)}, got {kind!r}")
    op = raw.get("op") if kind == "derived" else None
    if kind == "derived" and op not in OPS:
        raise ValueError(f"condition {name!r}: key 'op' must be one of {sorted(OPS)}, got {op!r}")
    allowed = (*_COMMON_KEYS, *_KIND_KEYS[kind], *(OPS[op] if op else ()))
    for key in raw:
        if key not in allowed:
            raise ValueError(f"condition {name!r}: unknown key {key!r} for kind {kind}"
                             f"{f' op {op}' if op else ''} (allowed: {', '.join(allowed)})")
    for key in ("metric", "detector"):
        if key not in raw:
            raise ValueError(f"condition {name!r}: key {key!r} is missing")
    metric, detector = raw["metric"], raw["detector"]
    if metric not in METRICS:
        raise ValueError(f"condition {name!r}: key 'metric' must be one of {list(METRICS)}, got {metric!r}")
    if detector not in DETECTORS:
        raise ValueError(f"condition {name!r}: key 'detector' must be one of {list(DETECTORS)}, got {detector!r}")
    channels = None
    if kind != "derived":
        if name not in SCAN_MAPS:
            raise ValueError(f"condition {name!r}: kind {kind} reads the scan map {name}.png, and scans carry only "
                             f"{sorted(SCAN_MAPS)}; a new condition from the photograph is kind derived")
        map_kind, map_channels = SCAN_MAPS[name]
        if kind != map_kind:
            raise ValueError(f"condition {name!r}: key 'kind' is {kind}, but {name}.png is a {map_kind}")
        if kind == "continuous":
            channels = raw.get("channels")
            if channels != map_channels:
                raise ValueError(f"condition {name!r}: key 'channels' must be {map_channels} (the channels of "
                                 f"{name}.png), got {channels!r}")
    # what fidelity can read back: a label map needs a segmenter (mIoU), a value map a regressor
    # (SSIM), a derived condition its own op (edge F1 for canny, SSIM for the others)
    want = {"label_map": ("segmentation", "miou"), "continuous": ("regression", "ssim"),
            "derived": ("none", "edge_f1" if op == "canny" else "ssim")}[kind]
    if detector != want[0]:
        raise ValueError(f"condition {name!r}: key 'detector' must be {want[0]} for kind {kind}, got {detector!r}")
    if metric != want[1]:
        raise ValueError(f"condition {name!r}: key 'metric' must be {want[1]} for kind {kind}"
                         f"{f' op {op}' if op else ''}, got {metric!r}")
    params = []
    for key, typ in (OPS[op].items() if op else ()):
        if key not in raw:
            raise ValueError(f"condition {name!r}: op {op} needs key {key!r}")
        params.append((key, _number(name, key, raw[key], typ)))
    clinic = raw.get("clinic")
    if clinic is not None and not (isinstance(clinic, str) and _NAME.match(clinic)):
        raise ValueError(f"condition {name!r}: key 'clinic' must be a plain folder name, got {clinic!r}")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"condition {name!r}: key 'description' must be a string, got {description!r}")
    return ConditionType(name, kind, metric, detector, channels, op, tuple(params), clinic,
                         description or _describe(kind, channels, op, dict(params)))


class ConditionTable(Mapping[str, ConditionType]):
    """The conditions of a params ``conditions`` section, in its order, each entry checked."""

    def __init__(self, section: Any):
        if not isinstance(section, Mapping) or not section:
            raise ValueError(f"params conditions must be a non-empty mapping of name -> entry, got {section!r}")
        self._by_name = {name: _entry(name, raw) for name, raw in section.items()}
        folders = [c.clinic for c in self._by_name.values() if c.clinic]
        if len(set(folders)) != len(folders):
            raise ValueError(f"params conditions: two conditions read the same clinic folder ({folders})")

    def __getitem__(self, name: str) -> ConditionType:
        return self._by_name[name]

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"ConditionTable({list(self._by_name)})"

    def names(self, **where: Any) -> tuple[str, ...]:
        """The names whose fields equal ``where`` (e.g. ``kind="derived"``), in table order."""
        return tuple(n for n, c in self._by_name.items() if all(getattr(c, k) == v for k, v in where.items()))

    @property
    def clinic_maps(self) -> tuple[str, ...]:
        """The maps a clinic scan may carry, in the order its meta.json lists them: the label map,
        then the one-channel, then the three-channel maps (the order clinic scans were always
        written in), table order within each."""
        maps = [c for c in self._by_name.values() if c.clinic]
        return tuple(c.name for c in sorted(maps, key=lambda c: (c.kind != "label_map", c.channels or 0)))


_TABLES: dict[tuple[str, int], ConditionTable] = {}


def condition_table(section: Mapping[str, Any] | None = None) -> ConditionTable:
    """The condition table: built from ``section`` (a params ``conditions`` mapping) when given,
    else read from the params file (``ctrlora.params.find_params_file``: ``$CTRLORA_PARAMS`` or
    the checkout's params.yaml; re-read when that file changes). A params file without a
    ``conditions`` section (a test's partial one) falls back to the checkout's params.yaml."""
    if section is not None:
        return ConditionTable(section)
    from ctrlora.params import find_params_file, load_params

    path = find_params_file().resolve()
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _TABLES:
        params = load_params(path)
        if "conditions" not in params:
            home = Path(__file__).resolve().parents[2] / "params.yaml"
            if home.resolve() == path or not home.is_file():
                raise ValueError(f"{path}: no conditions section (docs/data.md, \"Adding a condition\")")
            _TABLES[key] = condition_table_of(home)
        else:
            _TABLES[key] = ConditionTable(params["conditions"])
    return _TABLES[key]


def condition_table_of(params_file: str | Path) -> ConditionTable:
    """The condition table of one params file."""
    from ctrlora.params import load_params

    path = Path(params_file).resolve()
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _TABLES:
        section = load_params(path).get("conditions")
        if section is None:
            raise ValueError(f"{path}: no conditions section (docs/data.md, \"Adding a condition\")")
        _TABLES[key] = ConditionTable(section)
    return _TABLES[key]


class TableView(Mapping):
    """A read-only mapping computed from the current condition table (``CONDITIONS`` and the
    evaluation's ``PRIMARY_METRIC`` / ``DETECTED_CONDITIONS``): resolved on every access, so it
    follows ``$CTRLORA_PARAMS`` and is never read at import time."""

    def __init__(self, build: Callable[[ConditionTable], Mapping]):
        self._build = build
        self._cache: tuple[int, Mapping] | None = None

    def _now(self) -> Mapping:
        table = condition_table()
        if self._cache is None or self._cache[0] != id(table):
            self._cache = (id(table), self._build(table))
        return self._cache[1]

    def __getitem__(self, key):
        return self._now()[key]

    def __iter__(self):
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def __repr__(self) -> str:
        return repr(dict(self._now()))


CONDITIONS: Mapping[str, ConditionType] = TableView(lambda t: t)


def get_condition(name: str) -> ConditionType:
    try:
        return CONDITIONS[name]
    except KeyError:
        raise KeyError(f"unknown condition {name!r}; known: {', '.join(CONDITIONS)}") from None


def derived_conditions() -> tuple[str, ...]:
    """The conditions computed from a photograph alone, in table order."""
    return condition_table().names(kind="derived")


def encode_u8(condition: str, scan: Scan) -> np.ndarray:
    """The condition image as RGB uint8, as stored under ``data/prepared/conditions/<c>/``."""
    return np.clip(np.round(get_condition(condition).encode(scan) * 255.0), 0, 255).astype(np.uint8)
