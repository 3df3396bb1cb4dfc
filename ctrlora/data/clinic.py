"""A clinic's export turned into clinic scans that ingestion accepts.

Export layout (only ``photos/`` is required; docs/data.md, "A clinic's export")::

    EXPORT/
      photos/           the photographs: .jpg / .jpeg / .png directly in it (not recursive)
      annotations.json  COCO instance annotations (polygons or RLE) of the photographs
      masks/<stem>.png  label maps (index or colour) of the photograph photos/<stem>.<ext>
      depth/<stem>.png  depth maps, 8- or 16-bit gray, 0 = no surface, brighter = nearer
      normal/<stem>.png normal maps, RGB (n + 1) / 2, (0, 0, 0) = no surface
      captions.csv      columns file_name, caption (file_name: a photograph's name or stem)

Maps are matched to photographs inside the export only: COCO ``images`` entries by the base name
of their ``file_name``, PNG maps by the photograph's file stem, captions by file name or stem.
Every map is drawn on the upright photograph (after its EXIF orientation) and must have its size.

What the importer writes, per photograph, into the landing folder (``data/incoming``): a folder
``photo-<16 hex of the photograph file's sha256>`` (the id of :func:`ctrlora.data.photos.photo_scan_id`,
never from a file name) holding ``photo.png`` (normalised by :func:`ctrlora.data.photos.normalise_photo`,
EXIF orientation applied, metadata gone), the maps it has (``segmentation.png`` label ids,
``depth.png``, ``normal.png``) placed by the same :class:`ctrlora.data.photos.Geometry`, a
``meta.json`` with ``"kind": "clinic"`` (caption, maps, geometry, the source files' sha256 and
formats, no metadata value and no file name) and ``READY``, written last: the folder is built
hidden and renamed into place. Ingestion (:mod:`ctrlora.data.ingest`) then validates it against
the contract and moves it into the store.

A photograph that cannot be imported (see :data:`IMPORT_RULES`) never lands: its original files,
byte for byte and in the export's layout (so a fixed copy of that folder can be imported again),
go to ``quarantine/<id>/`` with a ``reason.json`` naming each file and rule
(:func:`ctrlora.data.ingest.quarantine_files`). The export itself is only read.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ctrlora.data.conditions import get_condition
from ctrlora.data.contract import CLINIC_KIND, CLINIC_MAPS, Violation
from ctrlora.data.files import png_bytes
from ctrlora.data.ingest import batch_id, quarantine_files
from ctrlora.data.labels import BACKGROUND, LabelTable, label_table
from ctrlora.data.photos import (ASPECTS, MAX_PHOTO_PIXELS, PHOTO_CAPTION, Geometry, NormalisedPhoto, PhotoRejected,
                                 is_photo_name, load_strictly, normalise_photo, photo_scan_id)
from ctrlora.data.scan import IMAGE_FILES, META, READY, meta_bytes

PHOTOS_DIR = "photos"
COCO_FILE = "annotations.json"
MAP_DIRS = CLINIC_MAPS  # map -> export sub-folder (params.yaml `conditions`, key `clinic`)
CAPTIONS_FILE = "captions.csv"
NORMAL_BACKGROUND = (128, 128, 255)  # n = (0, 0, 1), the rendered scans' background normal
NORMALISATION = ("photograph: EXIF orientation applied, pixel format by the mode rule, geometry (pad or crop), "
                 "Lanczos, 8-bit RGB, no metadata; segmentation: label ids, nearest neighbour; depth and normal: "
                 "mean over the pixels with a surface, a pixel keeps a surface when at least half of its area has one")

# rule name -> meaning; with the photograph rules of the contract (photo_format, photo_mode,
# photo_size, single_frame, header_within_limits, decodable) these are the rules a reason.json of
# the importer names
IMPORT_RULES: dict[str, str] = {
    "map_size": "a map (mask, depth, normal, COCO image entry or RLE) has its photograph's upright size",
    "map_format": "a map is a single-frame PNG whose pixel format the importer reads (label map: L, P, I;16 or "
                  "opaque RGB(A); depth: L or I;16; normal: opaque RGB(A))",
    "segmentation_labels": "every id of a label map is in the label table; every colour of a colour mask is a "
                           "label's display colour",
    "normal_unit_length": "every normal with a surface has unit length (within the tolerance) before resampling",
    "coco_category_mapped": "every COCO category an annotation uses is mapped to a label by params clinic.categories",
    "coco_annotation": "a COCO annotation has a known category_id and a polygon list or RLE segmentation",
    "coco_image_present": "a COCO annotation's image entry exists and names a photograph of photos/",
    "one_segmentation_source": "a photograph's masks come from COCO or from masks/, not both",
    "map_match": "a map's stem names exactly one photograph",
    "map_without_photo": "a map file in masks/, depth/ or normal/ has a photograph of the same stem",
    "caption_format": "at most one caption per photograph, one printable line of at most max_caption_chars",
}


class ClinicExportError(ValueError):
    """The export as a whole cannot be read (no photos/ folder, a broken annotations.json or
    captions.csv, a bad category mapping); nothing has been written."""


class Refused(Exception):
    """One source file of a photograph breaks an import rule."""

    def __init__(self, file: str, rule: str, detail: str):
        super().__init__(f"{file}: {rule}: {detail}")
        self.violation = Violation(scan_id="", file=file, rule=rule, detail=detail)


def default_categories(labels: LabelTable | None = None) -> dict[str, str]:
    """COCO category name -> label name: every label of the table (default: the project's, params
    ``labels``) under its own name."""
    return {lab.name: lab.name for lab in (labels or label_table()).labels}


@dataclass(frozen=True)
class ClinicConfig:
    resolution: int = 64
    aspect: str = "pad"  # pad (letterbox) | crop (largest centred square); see docs/data.md
    # COCO name -> label name; None: every label of `labels` under its own name
    categories: Mapping[str, str] | None = None
    max_pixels: int = MAX_PHOTO_PIXELS
    normal_tolerance: float = 0.1  # of the clinic's normals, before resampling (the contract then asks 0.03)
    max_caption_chars: int = 500
    # the table the maps land in (None: the project's, params `labels`); ingestion validates the
    # landed maps against the project's, so both should be the same file's
    labels: LabelTable | None = None

    def __post_init__(self) -> None:
        if self.aspect not in ASPECTS:
            raise ClinicExportError(f"params clinic.aspect must be one of {ASPECTS}, got {self.aspect!r}")
        if self.labels is None:
            object.__setattr__(self, "labels", label_table())
        if self.categories is None:
            object.__setattr__(self, "categories", default_categories(self.labels))
        if not isinstance(self.categories, Mapping) or not self.categories:
            raise ClinicExportError("params clinic.categories must map COCO category names to label names")
        # YAML reads an unquoted tooth number as an integer: names compare as strings
        categories = {str(k): str(v) for k, v in self.categories.items()}
        object.__setattr__(self, "categories", categories)
        labels = self.labels
        assert labels is not None  # set above
        unknown = {k: v for k, v in categories.items() if v not in labels.by_name}
        if unknown:
            raise ClinicExportError(
                f"params clinic.categories maps {unknown} to names that are not labels of the label table "
                f"(params labels; known: {', '.join(labels.by_name)}); tooth numbers such as FDI need their "
                "labels declared in params labels first (docs/data.md, \"Label table\")")

    @property
    def category_ids(self) -> dict[str, int]:
        labels, categories = self.labels, self.categories
        assert labels is not None and categories is not None  # set in __post_init__
        return {k: labels.by_name[v].id for k, v in categories.items()}

    @classmethod
    def from_params(cls, section: Mapping[str, Any] | None, resolution: int,
                    labels: LabelTable | None = None) -> "ClinicConfig":
        """From params.yaml's ``clinic`` section (absent keys keep their defaults), ``prepare.resolution``
        and the label table (None: the project's; :func:`ctrlora.data.labels.table_from_params` gives
        the table of the same params file)."""
        section = dict(section or {})
        unknown = sorted(set(section) - {"aspect", "categories", "normal_tolerance", "max_caption_chars"})
        if unknown:
            raise ClinicExportError(f"params clinic: unknown keys {unknown}")
        kwargs: dict[str, Any] = {k: section[k] for k in ("aspect", "normal_tolerance", "max_caption_chars") if k in section}
        if "categories" in section:
            kwargs["categories"] = dict(section["categories"] or {})
        return cls(resolution=int(resolution), labels=labels, **kwargs)


@dataclass
class ImportReport:
    landed: list[str] = field(default_factory=list)  # scan ids written to the landing folder
    already_landed: list[str] = field(default_factory=list)  # the id was in the landing folder (same file)
    quarantined: dict[str, str] = field(default_factory=dict)  # id -> quarantine folder name
    violations: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    maps: dict[str, list[str]] = field(default_factory=dict)  # landed id -> its maps
    skipped: list[str] = field(default_factory=list)  # entries of photos/ that are not photographs
    unmatched_captions: int = 0  # caption rows naming no photograph (left in the export)

    def as_dict(self) -> dict[str, Any]:
        return {"landed": self.landed, "already_landed": self.already_landed, "quarantined": self.quarantined,
                "violations": self.violations, "maps": self.maps, "skipped": self.skipped,
                "unmatched_captions": self.unmatched_captions}


# ------------------------------------------------------------------------- reading the export

@dataclass
class _Coco:
    images: dict[str, dict[str, Any]]  # photo base name -> image entry
    annotations: dict[Any, list[dict[str, Any]]]  # image id -> annotations in file order
    categories: dict[Any, str]  # category id -> name
    raw_categories: list[Any]
    duplicate_names: set[str]  # base names of more than one image entry


def _plain_files(folder: Path) -> list[str]:
    """Names of the entries of ``folder`` (sorted), or [] when it is absent."""
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _read_coco(path: Path) -> _Coco | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClinicExportError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ClinicExportError(f"{path}: a COCO file is an object with lists 'images', 'annotations' and 'categories'")
    images: dict[str, dict[str, Any]] = {}
    duplicates: set[str] = set()
    for entry in data["images"]:
        if not (isinstance(entry, dict) and "id" in entry and isinstance(entry.get("file_name"), str)
                and isinstance(entry.get("width"), int) and isinstance(entry.get("height"), int)):
            raise ClinicExportError(f"{path}: every images entry needs id, file_name, width and height")
        name = entry["file_name"].replace("\\", "/").rsplit("/", 1)[-1]
        if name in images:
            duplicates.add(name)
        images.setdefault(name, entry)
    annotations: dict[Any, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        if not (isinstance(ann, dict) and "image_id" in ann):
            raise ClinicExportError(f"{path}: every annotations entry needs an image_id")
        annotations.setdefault(ann["image_id"], []).append(ann)
    categories: dict[Any, str] = {}
    for cat in data["categories"]:
        if not (isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str)):
            raise ClinicExportError(f"{path}: every categories entry needs id and name")
        categories[cat["id"]] = cat["name"]
    return _Coco(images, annotations, categories, data["categories"], duplicates)


def _coco_subset(coco: _Coco, entry: dict[str, Any] | None, image_id: Any) -> bytes:
    """The COCO file of one photograph (its image entry, annotations, all categories)."""
    subset = {"images": [entry] if entry is not None else [], "annotations": coco.annotations.get(image_id, []),
              "categories": coco.raw_categories}
    return (json.dumps(subset, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _read_captions(path: Path, max_chars: int) -> dict[str, list[str]]:
    """captions.csv as file name or stem -> the captions given for it."""
    if not path.exists():
        return {}
    try:
        text = path.read_bytes().decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        fields = reader.fieldnames or []
        if "file_name" not in fields or "caption" not in fields:
            raise ClinicExportError(f"{path}: needs the columns file_name and caption (has {fields})")
        out: dict[str, list[str]] = {}
        for row in reader:
            out.setdefault((row["file_name"] or "").strip(), []).append(row["caption"] or "")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ClinicExportError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    return out


def _caption_row(name: str, caption: str) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "caption"])
    writer.writerow([name, caption])
    return buf.getvalue().encode("utf-8")


# ------------------------------------------------------------------------------ the maps

def _open_map(path: Path, rel: str, size: tuple[int, int]) -> Any:
    """The decoded PIL image of a map: a regular single-frame PNG of the photograph's upright size
    (the size is checked from the header, before any pixel is decoded)."""
    from PIL import Image

    if path.is_symlink() or not path.is_file():
        raise Refused(rel, "map_format", "not a plain file")
    try:
        im = Image.open(path)
    except Exception as exc:  # noqa: BLE001 - any failure to identify the file
        raise Refused(rel, "decodable", f"cannot read the image header: {type(exc).__name__}: {exc}") from None
    if im.format != "PNG":
        im.close()
        raise Refused(rel, "map_format", f"format {im.format}, expected PNG")
    if tuple(im.size) != tuple(size):
        im.close()
        raise Refused(rel, "map_size", f"size {im.size[0]}×{im.size[1]}, the photograph is {size[0]}×{size[1]} "
                                       "(upright, after its EXIF orientation)")
    if int(getattr(im, "n_frames", 1)) != 1:
        im.close()
        raise Refused(rel, "single_frame", "animated PNG; one still image expected")
    try:
        load_strictly(im)
    except Exception as exc:  # noqa: BLE001
        raise Refused(rel, "decodable", f"decoding failed: {type(exc).__name__}: {exc}") from None
    return im


def _opaque_rgb(im: Any, rel: str) -> np.ndarray:
    """H×W×3 uint8 of an RGB image, or of an RGBA / transparent-free palette one."""
    if im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"))
        if (rgba[..., 3] < 255).any():
            raise Refused(rel, "map_format", f"mode {im.mode} with transparent pixels")
        return rgba[..., :3].copy()
    if im.mode in ("RGB", "P"):
        return np.asarray(im.convert("RGB")).copy()
    raise Refused(rel, "map_format", f"mode {im.mode}, expected RGB")


def _pack(rgb: np.ndarray) -> np.ndarray:
    """Colours (…×3 uint8) as one integer each, 0xRRGGBB."""
    rgb = np.asarray(rgb, dtype=np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _colour_ids(labels: LabelTable) -> dict[int, int]:
    """Display colour (packed 0xRRGGBB) -> label id of ``labels``."""
    return {int(_pack(np.array(c))): i for c, i in labels.colour_ids.items()}


def _ids_from_colours(rgb: np.ndarray, rel: str, colour_ids: Mapping[int, int]) -> np.ndarray:
    """Label ids of a colour mask, by the label table's display colours."""
    packed = _pack(rgb)
    values, inverse = np.unique(packed, return_inverse=True)
    unknown = [v for v in values.tolist() if v not in colour_ids]
    if unknown:
        shown = ", ".join(f"({v >> 16}, {(v >> 8) & 255}, {v & 255})" for v in unknown[:5])
        raise Refused(rel, "segmentation_labels", f"{len(unknown)} colours are no label's display colour: {shown}")
    return np.array([colour_ids[v] for v in values.tolist()], dtype=np.uint8)[inverse.reshape(packed.shape)]


def read_label_map(path: Path, rel: str, size: tuple[int, int], labels: LabelTable | None = None) -> np.ndarray:
    """A label PNG as label ids (H×W uint8) of ``labels`` (default: the project's table). Index maps
    (``L``, ``I;16``, and ``P`` whose used palette colours are not all label colours) give the ids
    directly; colour masks (``RGB``, opaque ``RGBA``, and ``P`` painted with the label colours) are
    read by the label table's display colours."""
    labels = labels or label_table()
    colour_ids = _colour_ids(labels)
    with _open_map(path, rel, size) as im:
        if im.mode == "P":
            index = np.asarray(im).copy()
            palette = np.asarray(im.convert("RGB"))
            used = np.unique(_pack(palette))
            if all(v in colour_ids for v in used.tolist()) and "transparency" not in im.info:
                ids = _ids_from_colours(palette, rel, colour_ids)
            else:
                ids = index.astype(np.int64)
        elif im.mode in ("L", "I;16", "I;16L", "I;16B", "I"):
            ids = np.asarray(im).astype(np.int64)
        elif im.mode in ("RGB", "RGBA"):
            ids = _ids_from_colours(_opaque_rgb(im, rel), rel, colour_ids)
        else:
            raise Refused(rel, "map_format", f"mode {im.mode} is not a label map (L, P, I;16 or RGB)")
    bad = sorted(set(np.unique(ids).tolist()) - set(labels.by_id))
    if bad:
        raise Refused(rel, "segmentation_labels", f"ids {bad[:10]} are not in the label table ({len(labels.by_id)} "
                                                  f"labels, ids {min(labels.by_id)}..{max(labels.by_id)})")
    return ids.astype(np.uint8)


def read_depth(path: Path, rel: str, size: tuple[int, int]) -> np.ndarray:
    """A depth PNG as float32 on the 8-bit scale (0 = no surface): 8-bit values as they are;
    16-bit v > 0 mapped linearly onto 1..255 by ``1 + (v - 1) · 254 / 65534`` (0 stays 0, so a
    surface never becomes background)."""
    with _open_map(path, rel, size) as im:
        if im.mode == "L":
            return np.asarray(im).astype(np.float32)
        if im.mode in ("I;16", "I;16L", "I;16B", "I"):
            v = np.asarray(im).astype(np.float64)
            if v.min() < 0 or v.max() > 65535:
                raise Refused(rel, "map_format", f"mode {im.mode} with values outside 0..65535")
            return np.where(v > 0, 1.0 + (v - 1.0) * 254.0 / 65534.0, 0.0).astype(np.float32)
        raise Refused(rel, "map_format", f"mode {im.mode}; a depth map is 8- or 16-bit gray (L or I;16)")


def read_normals(path: Path, rel: str, size: tuple[int, int], tolerance: float) -> np.ndarray:
    """A normal PNG as float32 H×W×3 unit vectors, (0, 0, 0) where the pixel is (0, 0, 0) (no surface)."""
    with _open_map(path, rel, size) as im:
        rgb = _opaque_rgb(im, rel)
    surface = np.asarray(rgb.any(axis=-1), dtype=bool)
    n = np.where(surface[..., None], rgb.astype(np.float32) / 127.5 - 1.0, 0.0).astype(np.float32)
    err = np.abs(np.linalg.norm(n, axis=-1) - 1.0)[surface]
    if err.size and err.max() > tolerance:
        raise Refused(rel, "normal_unit_length", f"{int((err > tolerance).sum())} normals off unit length by more "
                                                 f"than {tolerance} (max {err.max():.3f}); expected (n + 1) / 2 · 255")
    return n


def rasterise_coco(entry: dict[str, Any], annotations: list[dict[str, Any]], categories: Mapping[Any, str],
                   category_ids: Mapping[str, int], size: tuple[int, int]) -> np.ndarray:
    """The label map (H×W uint8) of one photograph's COCO annotations, rasterised by pycocotools:
    polygons (``frPyObjects`` + ``merge``), uncompressed RLE (``frPyObjects``) and compressed RLE,
    decoded by ``pycocotools.mask.decode``. Annotations are painted in file order, so where
    instances overlap the later annotation wins; unannotated pixels are background. A category
    mapped to ``background`` is ignored, not painted: a finding drawn inside a tooth (caries, a
    filling) must not erase the tooth under it."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:
        raise ImportError("reading COCO annotations needs pycocotools: pip install 'ctrlora-dental[clinic]'") from exc

    width, height = entry["width"], entry["height"]
    if (width, height) != tuple(size):
        raise Refused(COCO_FILE, "map_size", f"images entry {entry['id']} declares {width}×{height}, the photograph "
                                             f"is {size[0]}×{size[1]} (upright, after its EXIF orientation)")
    label = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        where = f"annotation {ann.get('id')!r} of image {entry['id']!r}"
        if ann.get("category_id") not in categories:
            raise Refused(COCO_FILE, "coco_annotation", f"{where}: category_id {ann.get('category_id')!r} is not in categories")
        name = categories[ann["category_id"]]
        if name not in category_ids:
            raise Refused(COCO_FILE, "coco_category_mapped", f"{where}: category {name!r} is not mapped to a label "
                                                             "in params clinic.categories")
        if category_ids[name] == BACKGROUND:
            continue
        seg = ann.get("segmentation")
        try:
            if isinstance(seg, list) and seg and all(
                    isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                    and all(isinstance(x, (int, float)) and np.isfinite(x) for x in p) for p in seg):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
                if list(seg["size"]) != [height, width]:
                    raise Refused(COCO_FILE, "map_size", f"{where}: RLE size {seg['size']} is not [height, width] "
                                                         f"= {[height, width]}")
                if isinstance(seg["counts"], list):
                    rle = mask_utils.frPyObjects(seg, height, width)
                else:
                    counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
                    rle = {"size": [height, width], "counts": counts}
            else:
                raise Refused(COCO_FILE, "coco_annotation", f"{where}: segmentation is neither a list of polygons "
                                                            "(>= 3 points each) nor an RLE")
            with warnings.catch_warnings():
                # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless here
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = mask_utils.decode(rle)
        except Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - pycocotools' own errors on a malformed segmentation
            raise Refused(COCO_FILE, "coco_annotation", f"{where}: {type(exc).__name__}: {exc}") from None
        if mask.shape[:2] != (height, width):
            raise Refused(COCO_FILE, "coco_annotation", f"{where}: decoded to {mask.shape}, expected {(height, width)}")
        label[mask.reshape(height, width).astype(bool)] = category_ids[name]
    return label


# ------------------------------------------------------------------------------ geometry

def place_labels(ids: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Label ids placed like the photograph: nearest neighbour (no invented ids), background padding."""
    from PIL import Image

    return np.asarray(geometry.apply(Image.fromarray(ids, mode="L"), Image.Resampling.NEAREST, 0)).copy()


def _surface_mean(values: list[np.ndarray], surface: np.ndarray, geometry: Geometry) -> tuple[list[np.ndarray], np.ndarray]:
    """Each H×W float map placed like the photograph as the mean over the source pixels that have a
    surface (area weights of PIL's box filter); a pixel keeps a surface when at least half of its
    area has one. Padding has none."""
    from PIL import Image

    def place(a: np.ndarray) -> np.ndarray:
        return np.asarray(geometry.apply(Image.fromarray(a.astype(np.float32), mode="F"), Image.Resampling.BOX, 0.0))

    weight = place(surface.astype(np.float32))
    keep = weight >= 0.5
    means = [np.where(keep, place(v * surface) / np.maximum(weight, 1e-12), 0.0) for v in values]
    return means, keep


def place_depth(depth: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Depth (8-bit scale, 0 = no surface) placed like the photograph; uint8, 1..255 on a surface."""
    (mean,), keep = _surface_mean([depth], depth > 0, geometry)
    return np.where(keep, np.clip(np.round(mean), 1, 255), 0).astype(np.uint8)


def place_normals(normals: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Normals placed like the photograph, renormalised, encoded ``round(255 · (n + 1) / 2)``;
    (128, 128, 255) = n (0, 0, 1) where there is no surface, as in the rendered scans."""
    surface = np.asarray(normals.any(axis=-1), dtype=bool)
    means, keep = _surface_mean([normals[..., k] for k in range(3)], surface, geometry)
    n = np.stack(means, axis=-1)
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    keep &= length[..., 0] > 1e-6
    unit = n / np.maximum(length, 1e-12)
    out = np.round(255.0 * (unit + 1.0) / 2.0)
    return np.where(keep[..., None], np.clip(out, 0, 255), np.array(NORMAL_BACKGROUND)).astype(np.uint8)


# ------------------------------------------------------------------------------ one photograph

@dataclass
class _Sources:
    """What the export holds for one photograph: relative path -> file, and its COCO part."""

    photo: str
    maps: dict[str, list[str]] = field(default_factory=dict)  # map -> relative paths (more than one: ambiguous)
    coco_entry: dict[str, Any] | None = None
    coco_duplicate: bool = False
    captions: list[str] = field(default_factory=list)
    stem_shared: bool = False  # another photograph has the same stem


class _Refusals(Exception):
    """Every independent problem of one photograph (a refused photograph stops at itself; each map
    and the caption are checked on their own)."""

    def __init__(self, problems: list[Refused]):
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


@dataclass
class _Converted:
    photo: NormalisedPhoto
    maps: dict[str, np.ndarray]  # placed maps, uint8
    record: dict[str, Any]  # the sources' formats and hashes (meta.json "source")
    caption: str
    from_captions: bool


def _convert(export: Path, src: _Sources, coco: _Coco | None, cfg: ClinicConfig) -> _Converted:
    """One photograph and its maps, normalised and placed; raises :class:`_Refusals`."""
    problems: list[Refused] = []
    try:
        photo = normalise_photo(export / src.photo, cfg.resolution, cfg.max_pixels, aspect=cfg.aspect, draft=False)
    except PhotoRejected as exc:
        raise _Refusals([Refused(src.photo, exc.rule, exc.detail)]) from None
    geometry = photo.geometry
    assert geometry is not None
    size = geometry.size
    maps: dict[str, np.ndarray] = {}
    record: dict[str, Any] = {"photo": {**photo.source, "sha256": _sha256(export / src.photo)}}

    for name, paths in src.maps.items():
        if len(paths) > 1 or src.stem_shared:
            problems.append(Refused(paths[0], "map_match", "its stem names more than one photograph or map file"))
    has_coco = src.coco_entry is not None and coco is not None and bool(coco.annotations.get(src.coco_entry["id"]))
    if src.coco_duplicate:
        problems.append(Refused(COCO_FILE, "coco_annotation", "more than one images entry names this photograph"))
    if has_coco and "segmentation" in src.maps:
        problems.append(Refused(src.maps["segmentation"][0], "one_segmentation_source",
                                f"the photograph also has annotations in {COCO_FILE}"))
    if problems:
        raise _Refusals(problems)

    if has_coco:
        assert coco is not None and src.coco_entry is not None
        try:
            ids = rasterise_coco(src.coco_entry, coco.annotations[src.coco_entry["id"]], coco.categories,
                                 cfg.category_ids, size)
            maps["segmentation"] = place_labels(ids, geometry)
            subset = _coco_subset(coco, src.coco_entry, src.coco_entry["id"])
            record["segmentation"] = {"from": "coco", "annotations": len(coco.annotations[src.coco_entry["id"]]),
                                      "sha256": hashlib.sha256(subset).hexdigest()}
        except Refused as exc:
            problems.append(exc)
    # a map is read as its condition's kind says: label ids, a gray map (8- or 16-bit, 0 = no
    # surface) or an RGB normal map
    readers = {
        ("label_map", None): lambda p, rel: place_labels(read_label_map(p, rel, size, cfg.labels), geometry),
        ("continuous", 1): lambda p, rel: place_depth(read_depth(p, rel, size), geometry),
        ("continuous", 3): lambda p, rel: place_normals(read_normals(p, rel, size, cfg.normal_tolerance), geometry),
    }
    for name in CLINIC_MAPS:
        if name not in src.maps:
            continue
        rel = src.maps[name][0]
        c = get_condition(name)
        try:
            maps[name] = readers[(c.kind, c.channels)](export / rel, rel)
            record[name] = {"from": "png", "sha256": _sha256(export / rel)}
        except Refused as exc:
            problems.append(exc)

    caption, from_captions = PHOTO_CAPTION, False
    if len(src.captions) > 1:
        problems.append(Refused(CAPTIONS_FILE, "caption_format", f"{len(src.captions)} captions for one photograph"))
    elif src.captions and src.captions[0].strip():
        text = src.captions[0].strip()
        if not text.isprintable() or len(text) > cfg.max_caption_chars:
            problems.append(Refused(CAPTIONS_FILE, "caption_format", f"not one printable line of at most "
                                                                     f"{cfg.max_caption_chars} characters"))
        caption, from_captions = text, True
    if problems:
        raise _Refusals(problems)
    return _Converted(photo, maps, record, caption, from_captions)


def _sha256(path: Path) -> str:
    from ctrlora.data.files import sha256_file

    return sha256_file(path)


def clinic_scan_meta(scan_id: str, cfg: ClinicConfig, photo: NormalisedPhoto, maps: list[str], caption: str,
                     from_captions: bool, record: dict[str, Any]) -> dict[str, Any]:
    """``meta.json`` of a clinic scan: caption, maps, how they were made and the source files'
    hashes and formats; no metadata value of any file and no file name."""
    assert photo.geometry is not None
    return {"scan_id": scan_id, "kind": CLINIC_KIND, "resolution": cfg.resolution, "caption": caption,
            "caption_source": CAPTIONS_FILE if from_captions else "default", "maps": maps,
            "pixel_sha256": photo.pixel_sha256, "geometry": photo.geometry.as_dict(),
            "normalisation": NORMALISATION, "source": record}


def _land(incoming: Path, scan_id: str, files: dict[str, bytes]) -> None:
    """Write ``incoming/<scan_id>/`` by the landing protocol: a hidden folder, READY last, renamed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{scan_id}-", dir=incoming))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / READY).write_bytes(b"")
        os.chmod(tmp, 0o755)
        os.rename(tmp, incoming / scan_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------ the export

def _index_export(export: Path, coco: _Coco | None, captions: dict[str, list[str]], report: ImportReport
                  ) -> tuple[list[_Sources], dict[str, str], list[tuple[str, Any]]]:
    """(the photographs' sources, orphan maps: relative path -> rule detail, orphan COCO images:
    (base name, image id))."""
    photos_dir = export / PHOTOS_DIR
    names = []
    for name in _plain_files(photos_dir):
        path = photos_dir / name
        if is_photo_name(name) and path.is_file() and not path.is_symlink():
            names.append(name)
        else:
            report.skipped.append(f"{PHOTOS_DIR}/{name}")
    stems: dict[str, list[str]] = {}
    for name in names:
        stems.setdefault(Path(name).stem, []).append(name)
    sources = {name: _Sources(photo=f"{PHOTOS_DIR}/{name}", stem_shared=len(stems[Path(name).stem]) > 1)
               for name in names}
    orphan_maps: dict[str, str] = {}
    for map_name, sub in MAP_DIRS.items():
        for name in _plain_files(export / sub):
            path = export / sub / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                report.skipped.append(f"{sub}/{name}")
                continue
            owners = stems.get(Path(name).stem, [])
            if not owners:
                orphan_maps[f"{sub}/{name}"] = f"no photograph {PHOTOS_DIR}/{Path(name).stem}.* in the export"
                continue
            for owner in owners:
                sources[owner].maps.setdefault(map_name, []).append(f"{sub}/{name}")
    orphan_images: list[tuple[str, Any]] = []
    if coco is not None:
        for base, entry in coco.images.items():
            if base in sources:
                sources[base].coco_entry = entry
                sources[base].coco_duplicate = base in coco.duplicate_names
            else:
                orphan_images.append((base, entry["id"]))
        known_ids = {entry["id"] for entry in coco.images.values()}
        orphan_images += [("", image_id) for image_id in coco.annotations if image_id not in known_ids]
    matched: set[str] = set()
    for name, src in sources.items():
        for key in (name, Path(name).stem):
            if key in captions:
                src.captions += captions[key]
                matched.add(key)
    report.unmatched_captions = sum(len(v) for k, v in captions.items() if k not in matched)
    return [sources[n] for n in names], orphan_maps, orphan_images


def import_clinic(export: str | Path, incoming: str | Path, quarantine: str | Path,
                  cfg: ClinicConfig | None = None) -> ImportReport:
    """Import the clinic export ``export`` (module docstring): one landing folder per photograph
    in ``incoming``, refused photographs and orphan maps / annotations in ``quarantine``.
    Raises :class:`ClinicExportError` before writing anything when the export cannot be read.
    ``cfg`` None: the defaults, with the project's label table as it is at the call."""
    cfg = cfg if cfg is not None else ClinicConfig()
    export, incoming, quarantine = Path(export), Path(incoming), Path(quarantine)
    if not (export / PHOTOS_DIR).is_dir():
        raise ClinicExportError(f"{export}: no {PHOTOS_DIR}/ folder (the export layout is in docs/data.md)")
    coco = _read_coco(export / COCO_FILE)
    captions = _read_captions(export / CAPTIONS_FILE, cfg.max_caption_chars)
    report = ImportReport()
    sources, orphan_maps, orphan_images = _index_export(export, coco, captions, report)
    incoming.mkdir(parents=True, exist_ok=True)
    batch = "import-" + batch_id()

    def refuse(scan_id: str, files: dict[str, bytes], problems: list[Violation]) -> None:
        name = quarantine_files(quarantine, scan_id, files, problems, batch, source="import-clinic")
        report.quarantined[scan_id] = name
        report.violations[scan_id] = [v.as_dict() for v in problems]

    for src in sources:
        data = (export / src.photo).read_bytes()
        scan_id = photo_scan_id(data)
        if os.path.lexists(incoming / scan_id) or scan_id in report.landed:
            report.already_landed.append(scan_id)
            continue
        try:
            done = _convert(export, src, coco, cfg)
        except _Refusals as exc:
            files = {src.photo: data}
            for paths in src.maps.values():
                files.update({p: (export / p).read_bytes() for p in paths
                              if (export / p).is_file() and not (export / p).is_symlink()})
            if src.coco_entry is not None and coco is not None:
                files[COCO_FILE] = _coco_subset(coco, src.coco_entry, src.coco_entry["id"])
            if src.captions:
                files[CAPTIONS_FILE] = _caption_row(Path(src.photo).name, src.captions[0])
            refuse(scan_id, files, [p.violation for p in exc.problems])
            continue
        names = [m for m in CLINIC_MAPS if m in done.maps]
        meta = clinic_scan_meta(scan_id, cfg, done.photo, names, done.caption, done.from_captions, done.record)
        files = {"photo.png": png_bytes(done.photo.pixels, "RGB")}
        files.update({f"{m}.png": png_bytes(done.maps[m], IMAGE_FILES[f"{m}.png"]) for m in names})
        files[META] = meta_bytes(meta)
        _land(incoming, scan_id, files)
        report.landed.append(scan_id)
        report.maps[scan_id] = names

    for rel, detail in sorted(orphan_maps.items()):
        data = (export / rel).read_bytes()
        refuse("orphan-" + hashlib.sha256(data).hexdigest()[:16], {rel: data},
               [Violation("", rel, "map_without_photo", detail)])
    if coco is not None:
        for base, image_id in orphan_images:
            entry = coco.images.get(base) if base else None
            subset = _coco_subset(coco, entry, image_id)
            detail = (f"images entry {image_id!r} names {base!r}, which is not in {PHOTOS_DIR}/" if base
                      else f"annotations reference image id {image_id!r}, which has no images entry")
            refuse("orphan-" + hashlib.sha256(subset).hexdigest()[:16], {COCO_FILE: subset},
                   [Violation("", COCO_FILE, "coco_image_present", detail)])
    return report


if __name__ == "__main__":
    import sys

    from ctrlora.cli import main

    sys.exit(main(["import-clinic", *sys.argv[1:]]))
