"""The scan data contract: a manifest table (one row per scan × file) and its validation with
great-expectations.

Checks that need the file itself (is it a regular file inside the data folder, does its PNG
header declare a sane size, does it decode, are its values in range) are computed here into
manifest columns, without ever following a symlink or decoding an image whose header has not
been checked. great-expectations then validates the table: each expectation carries the name of
the contract rule it enforces in its ``meta``, and each unexpected row points back to a
(scan, file) pair. Null cells mean "not reached" (an earlier rule already failed for that file)
and are ignored by the expectations, so every broken file reports the first rule it breaks.

Four scan layouts (:func:`scan_layout`): a *clinic* scan, written by the clinic importer
(:mod:`ctrlora.data.clinic`: ``photo.png``, any subset of ``segmentation.png`` / ``depth.png`` /
``normal.png`` as its ``meta.json`` declares them, that ``meta.json`` with ``"kind": "clinic"``,
READY); a *rendered* scan (photo, four maps, meta.json, READY); a *photo-only* scan, as the
accepted store holds a clinic photograph (``photo.png`` at the resolution, a ``meta.json`` with
``"kind": "photo"``, READY); and, while ingesting only, a *landed photograph* (READY plus one JPEG
or PNG of any name and reasonable size, normalised by :mod:`ctrlora.data.photos`). A folder whose
meta.json says ``"kind": "clinic"`` is a clinic scan; otherwise a folder holding any of the four
maps is a rendered scan.
"""
from __future__ import annotations

import json
import math
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctrlora.data.conditions import TableView
from ctrlora.data.files import sha256_file
from ctrlora.data.labels import BACKGROUND, label_table
from ctrlora.data.photos import (MAX_PHOTO_PIXELS, MODE_RULE, PHOTO_KIND, PHOTO_SCAN_FILES, NormalisedPhoto,
                                 PhotoRejected, is_photo_name, normalise_photo, pixel_sha256, png_metadata_chunks)
from ctrlora.data.scan import IMAGE_FILES, META, READY, REQUIRED_FILES, SCAN_ID_PATTERN

RENDERED_MAPS = tuple(n for n in IMAGE_FILES if n != "photo.png")
CLINIC_KIND = "clinic"  # meta.json "kind" of a clinic scan
# the maps a clinic scan may carry (as <name>.png) -> the clinic export folder they come from: the
# params.yaml `conditions` entries with a `clinic` folder, in the order meta.json lists them
CLINIC_MAPS = TableView(lambda t: {n: t[n].clinic for n in t.clinic_maps})
MAX_CLINIC_META_BYTES = 1 << 20  # a larger meta.json is not read to decide the layout

# rule name -> what it means (the names appear in reason.json and validation.json)
RULES: dict[str, str] = {
    "scan_id_format": f"scan folder name matches {SCAN_ID_PATTERN}",
    "unique_scan_id": "scan id not already in the accepted store / data set",
    "manifest_rows_unique": "one manifest row per (scan, file)",
    "required_file_present": "every file of the scan layout exists",
    "path_inside_root": "the path (symlinks resolved) stays inside the data folder",
    "regular_file": "a plain file, not a symlink, folder or device",
    "known_file": "no files beyond the scan layout",
    "non_empty_file": "file is not empty (READY may be)",
    "decodable": "PNG header parses and the image decodes fully; meta.json is JSON",
    "header_within_limits": "declared width × height within the max-pixels guard (checked before decoding)",
    "expected_size": "image is resolution × resolution",
    "expected_mode": "PIL mode as in the layout (RGB or L, 8-bit)",
    "segmentation_labels": "every segmentation value is an id of the label table",
    "normal_unit_length": "decoded normals have unit length within tolerance",
    "depth_range": "depth is 0 exactly on background and in 1..255 elsewhere",
    "lighting_range": "lighting is 0 on background",
    "meta_schema": "meta.json has the required keys with valid values",
    "unique_content": "the photograph's sha256 is not already present (duplicate scan); for a photo-only "
                      "scan the sha256 of its normalised pixels",
    "single_frame": "a still image: one frame (animated PNG and other multi-frame files refused)",
    "metadata_free": "a PNG holds no metadata chunk (text, EXIF, XMP, ICC profile, time; only pixel chunks)",
    "photo_format": "a landed photograph is a JPEG or PNG file",
    "photo_mode": f"a landed photograph's pixel format converts by the rule: {MODE_RULE}",
    "photo_size": "a landed photograph's shorter side is at least the resolution and its aspect at most 4:1",
}
# layouts of a scan folder (see the module docstring)
RENDERED, PHOTO, LANDED_PHOTO, CLINIC = "rendered", "photo", "landed_photo", "clinic"

SCAN_RULES = frozenset({"scan_id_format", "unique_scan_id"})  # about the scan, not one file

MANIFEST_COLUMNS = [
    "scan_id", "file", "path", "present", "inside_root", "regular", "known", "size_bytes",
    "non_empty", "sha256", "decodable", "header_ok", "width", "height", "mode", "expected_mode",
    "labels_ok", "normals_ok", "depth_ok", "lighting_ok", "meta_ok", "scan_id_new",
    "content_unique", "detail", "single_frame", "metadata_free", "photo_format_ok", "photo_mode_ok",
    "photo_size_ok", "content_sha256",
]
# rule of a PhotoRejected -> the manifest column that records it
_PHOTO_RULE_COLUMNS = {"decodable": "decodable", "header_within_limits": "header_ok", "single_frame": "single_frame",
                       "photo_format": "photo_format_ok", "photo_mode": "photo_mode_ok", "photo_size": "photo_size_ok"}


class ContractError(RuntimeError):
    """A data set that must be valid (e.g. the input of ``prepare``) broke the contract."""


@dataclass(frozen=True)
class ContractConfig:
    resolution: int = 64
    max_pixels: int = 1 << 24  # decompression-bomb guard on the declared header size
    max_photo_pixels: int = MAX_PHOTO_PIXELS  # the same for a landed photograph (any size, then normalised)
    normal_tolerance: float = 0.03


@dataclass(frozen=True)
class Violation:
    scan_id: str
    file: str
    rule: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "rule": self.rule, "detail": self.detail}


@dataclass
class ValidationOutcome:
    manifest: pd.DataFrame
    violations: dict[str, list[Violation]]  # scan_id -> what it broke
    report: dict[str, Any]  # the GX validation result as JSON-able dict
    valid_scans: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.violations


# -------------------------------------------------------------------------- per-file checks

def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _check_meta(data: bytes, scan_id: str, cfg: ContractConfig) -> tuple[bool, bool | None, str]:
    """(decodable, meta_ok, detail)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return False, None, f"not JSON: {exc}"
    problems = []
    if not isinstance(meta, dict):
        return True, False, "meta.json is not an object"
    if meta.get("scan_id", scan_id) != scan_id:
        problems.append(f"scan_id {meta.get('scan_id')!r} differs from folder name")
    if meta.get("resolution") != cfg.resolution:
        problems.append(f"resolution {meta.get('resolution')!r} != {cfg.resolution}")
    if not isinstance(meta.get("seed"), int):
        problems.append("seed missing or not an integer")
    if meta.get("jaw") not in ("both", "upper", "lower"):
        problems.append(f"jaw {meta.get('jaw')!r} not in both/upper/lower")
    for key in ("teeth_present", "teeth_missing"):
        if not isinstance(meta.get(key), list) or not all(isinstance(x, str) for x in meta[key]):
            problems.append(f"{key} missing or not a list of names")
    from ctrlora.data.captions import SHADE_WORDS

    if meta.get("shade") not in SHADE_WORDS:
        problems.append(f"shade {meta.get('shade')!r} not in {SHADE_WORDS}")
    light = meta.get("light_direction")
    if not (isinstance(light, list) and len(light) == 3 and all(isinstance(x, (int, float)) for x in light)
            and abs(math.sqrt(sum(float(x) ** 2 for x in light)) - 1.0) < 1e-3):
        problems.append("light_direction is not a unit 3-vector")
    return True, not problems, "; ".join(problems)


Verdict = tuple[bool, bool | None, str]  # (decodable, meta_ok, detail) of a meta.json


def _ingested_meta(data: bytes, scan_id: str, cfg: ContractConfig, kind: str,
                   kind_hint: str = "") -> tuple[Verdict | None, dict[str, Any], list[str]]:
    """The checks a meta.json written by ingestion or the importer shares: ``(verdict, meta,
    problems)``; ``verdict`` is final when the file is not a JSON object, else ``None`` and
    ``problems`` lists a wrong ``kind``, ``scan_id`` or ``resolution``."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return (False, None, f"not JSON: {exc}"), {}, []
    if not isinstance(meta, dict):
        return (True, False, "meta.json is not an object"), {}, []
    problems = []
    if meta.get("kind") != kind:
        problems.append(f"kind {meta.get('kind')!r}, expected {kind!r}{kind_hint}")
    if meta.get("scan_id") != scan_id:
        problems.append(f"scan_id {meta.get('scan_id')!r} differs from folder name")
    if meta.get("resolution") != cfg.resolution:
        problems.append(f"resolution {meta.get('resolution')!r} != {cfg.resolution}")
    return None, meta, problems


def _check_photo_meta(data: bytes, scan_id: str, cfg: ContractConfig) -> Verdict:
    """(decodable, meta_ok, detail) of a photo-only scan's meta.json (written by ingestion)."""
    verdict, _, problems = _ingested_meta(data, scan_id, cfg, PHOTO_KIND, " in a folder without rendered maps")
    return verdict or (True, not problems, "; ".join(problems))


def _check_clinic_meta(data: bytes, scan_id: str, cfg: ContractConfig) -> Verdict:
    """(decodable, meta_ok, detail) of a clinic scan's meta.json (written by the importer)."""
    verdict, meta, problems = _ingested_meta(data, scan_id, cfg, CLINIC_KIND)
    if verdict:
        return verdict
    caption = meta.get("caption")
    if not (isinstance(caption, str) and caption.strip() and caption.isprintable()):
        problems.append("caption missing, empty or not one printable line")
    maps = meta.get("maps")
    if not (isinstance(maps, list) and all(m in CLINIC_MAPS for m in maps) and len(set(maps)) == len(maps)):
        problems.append(f"maps {maps!r} is not a list of distinct names from {list(CLINIC_MAPS)}")
    return True, not problems, "; ".join(problems)


def _open_png(path: Path, cfg: ContractConfig, expected_mode: str, row: dict[str, Any]) -> np.ndarray | None:
    """Header first, then the guards, then decode. Fills the row; returns the pixels or None."""
    from PIL import Image

    try:
        im = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL's own guard fired on the declared size
        row.update(header_ok=False, detail=f"header declares a decompression bomb: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to identify the file is "not decodable"
        row.update(decodable=False, detail=f"cannot read PNG header: {type(exc).__name__}: {exc}")
        return None
    with im:
        if im.format != "PNG":
            row.update(decodable=False, detail=f"format {im.format}, expected PNG")
            return None
        width, height = im.size
        row.update(width=width, height=height)
        if width * height > cfg.max_pixels:
            row.update(header_ok=False, width=None, height=None,
                       detail=f"header declares {width}×{height} > {cfg.max_pixels} pixels")
            return None
        row["header_ok"] = True
        frames = int(getattr(im, "n_frames", 1))
        row["single_frame"] = frames == 1
        if frames != 1:
            row["detail"] = f"animated PNG with {frames} frames; one still image expected"
            return None
        if (width, height) != (cfg.resolution, cfg.resolution):
            row["detail"] = f"size {width}×{height}, expected {cfg.resolution}×{cfg.resolution}"
            return None
        row.update(mode=im.mode, expected_mode=expected_mode)
        if im.mode != expected_mode:
            row["detail"] = f"mode {im.mode}, expected {expected_mode}"
            return None
        from PIL import ImageFile

        lenient = ImageFile.LOAD_TRUNCATED_IMAGES  # a truncated file must fail here, whatever the caller set
        try:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            pixels = np.asarray(im).copy()
        except Exception as exc:  # noqa: BLE001
            row.update(decodable=False, detail=f"decoding failed: {type(exc).__name__}: {exc}")
            return None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    row["decodable"] = True
    chunks = png_metadata_chunks(path.read_bytes())
    row["metadata_free"] = not chunks
    if chunks:
        row["detail"] = f"metadata chunks {', '.join(chunks)}"
        return None
    return pixels


def _inspect_landed_photo(path: Path, cfg: ContractConfig, row: dict[str, Any]) -> NormalisedPhoto | None:
    """Fill the row of a landed photograph (already checked as a plain, non-empty file inside the
    data folder): normalise it, recording the first rule it breaks."""
    try:
        photo = normalise_photo(path, cfg.resolution, cfg.max_photo_pixels)
    except PhotoRejected as exc:
        row.update({_PHOTO_RULE_COLUMNS[exc.rule]: False, "detail": exc.detail})
        return None
    row.update(decodable=True, header_ok=True, single_frame=True, photo_format_ok=True, photo_mode_ok=True,
               photo_size_ok=True, content_sha256=photo.pixel_sha256)
    return photo


def _inspect_file(path: Path, name: str, scan_id: str, root_real: str, cfg: ContractConfig,
                  row: dict[str, Any], layout: str = RENDERED, known: frozenset[str] | tuple[str, ...] = REQUIRED_FILES
                  ) -> np.ndarray | NormalisedPhoto | None:
    """Fill ``row`` for one entry of a (non-linked) scan folder, stopping at the first failed
    check; returns the decoded pixels of a layout image (the normalised photo of a landed
    photograph), else ``None``."""
    if not os.path.lexists(path):
        row.update(present=False, detail="missing")
        return None
    row["present"] = True
    inside = _inside(str(path), root_real)
    row["inside_root"] = inside
    if not inside:
        row["detail"] = f"resolves to {os.path.realpath(path)}, outside the data folder"
        return None
    st = os.lstat(path)
    row["regular"] = stat.S_ISREG(st.st_mode)
    if not row["regular"]:
        row["detail"] = "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        return None
    row["known"] = name in known
    if not row["known"]:
        if layout == CLINIC:
            row["detail"] = ("file not in the scan layout of a clinic scan (photo.png, meta.json, READY and the "
                             "maps its meta.json lists)")
        else:
            row["detail"] = "file not in the scan layout" + ("" if layout == RENDERED else f" of a {layout.replace('_', ' ')}")
        return None
    row["size_bytes"] = st.st_size
    if name == READY:
        return None
    row["non_empty"] = st.st_size > 0
    if not row["non_empty"]:
        row["detail"] = "empty file"
        return None
    row["sha256"] = sha256_file(path)
    if name == META:
        check = {PHOTO: _check_photo_meta, CLINIC: _check_clinic_meta}.get(layout, _check_meta)
        row["decodable"], row["meta_ok"], row["detail"] = check(path.read_bytes(), scan_id, cfg)
        return None
    if layout == LANDED_PHOTO:
        return _inspect_landed_photo(path, cfg, row)
    return _open_png(path, cfg, IMAGE_FILES[name], row)


def _check_maps(arrays: dict[str, np.ndarray], by_name: dict[str, dict[str, Any]], cfg: ContractConfig,
                consistency: bool = True) -> None:
    """The checks across a scan's decoded maps: label table, unit normals, and (``consistency``:
    a rendered scan, whose maps come from one scene) depth / lighting consistent with the
    segmentation's background. A clinic's depth and its annotators' masks come from different
    hands and need not agree at the outline, so clinic scans skip that last check."""
    seg = arrays.get("segmentation.png")
    if seg is not None:
        bad = np.setdiff1d(np.unique(seg), np.array(label_table().ids))  # the project's table (params labels)
        by_name["segmentation.png"]["labels_ok"] = bad.size == 0
        if bad.size:
            by_name["segmentation.png"]["detail"] = f"labels {bad.tolist()} not in the label table"
    if "normal.png" in arrays:
        n = arrays["normal.png"].astype(np.float32) / 127.5 - 1.0
        err = np.abs(np.linalg.norm(n, axis=-1) - 1.0)
        ok = bool(err.max() <= cfg.normal_tolerance)
        by_name["normal.png"]["normals_ok"] = ok
        if not ok:
            by_name["normal.png"]["detail"] = f"{int((err > cfg.normal_tolerance).sum())} normals off unit length (max error {err.max():.3f})"
    if seg is not None and consistency:
        fg = seg != BACKGROUND
        if "depth.png" in arrays:
            d = arrays["depth.png"]
            ok = bool(np.all(d[~fg] == 0) and np.all(d[fg] >= 1))
            by_name["depth.png"]["depth_ok"] = ok
            if not ok:
                by_name["depth.png"]["detail"] = "depth is not 0 exactly on background / >= 1 on foreground"
        if "lighting.png" in arrays:
            ok = bool(np.all(arrays["lighting.png"][~fg] == 0))
            by_name["lighting.png"]["lighting_ok"] = ok
            if not ok:
                by_name["lighting.png"]["detail"] = "lighting is not 0 on background"


def clinic_meta(scan_dir: Path) -> dict[str, Any] | None:
    """The meta.json of a clinic scan folder (a JSON object with ``"kind": "clinic"``), else None.
    Read only when it is a plain file (never through a symlink) of at most
    :data:`MAX_CLINIC_META_BYTES`; the contract checks it fully later."""
    path = Path(scan_dir) / META
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CLINIC_META_BYTES:
        return None
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == CLINIC_KIND else None


def clinic_map_names(meta: dict[str, Any]) -> tuple[str, ...]:
    """The maps a clinic meta.json declares, in :data:`CLINIC_MAPS` order (unknown names are
    left out here; the meta.json check reports them)."""
    maps = meta.get("maps")
    declared = set(maps) if isinstance(maps, list) and all(isinstance(m, str) for m in maps) else set()
    return tuple(m for m in CLINIC_MAPS if m in declared)


def scan_layout(scan_dir: Path, landed_photos: bool = False) -> str:
    """:data:`CLINIC` when the folder's meta.json says so; else :data:`RENDERED` when the folder
    holds any rendered map (or is not a plain folder), else :data:`LANDED_PHOTO` while ingesting
    (``landed_photos``), else :data:`PHOTO`."""
    scan_dir = Path(scan_dir)
    if os.path.islink(scan_dir) or not os.path.isdir(scan_dir):
        return RENDERED
    if clinic_meta(scan_dir) is not None:
        return CLINIC
    if any(os.path.lexists(scan_dir / m) for m in RENDERED_MAPS):
        return RENDERED
    return LANDED_PHOTO if landed_photos else PHOTO


def _layout_files(scan_dir: Path, layout: str, dir_usable: bool) -> tuple[list[str], tuple[str, ...]]:
    """(row names in order, the files the layout knows) of a scan folder."""
    entries = sorted(os.listdir(scan_dir)) if dir_usable else []
    if layout == LANDED_PHOTO:
        photos = [n for n in entries if is_photo_name(n)]
        photo = photos[0] if photos else "photo.jpg"  # a missing photograph is reported under this name
        known: tuple[str, ...] = (photo, READY)
        return [photo, READY] + [n for n in entries if n not in known], known
    if layout == CLINIC:
        meta = clinic_meta(scan_dir) or {}
        known = ("photo.png", *(f"{m}.png" for m in clinic_map_names(meta)), META, READY)
        return list(known) + [n for n in entries if n not in known], known
    known = PHOTO_SCAN_FILES if layout == PHOTO else REQUIRED_FILES
    return list(known) + [n for n in entries if n not in known], known


def inspect_scan(scan_dir: Path, root: Path, cfg: ContractConfig, landed_photos: bool = False,
                 normalised: dict[str, NormalisedPhoto] | None = None) -> list[dict[str, Any]]:
    """Manifest rows of one scan folder: one per layout file plus one per unexpected entry.
    ``landed_photos``: a folder without rendered maps is a landed photograph; its normalised photo
    is put into ``normalised`` under the scan id."""
    scan_dir = Path(scan_dir)
    root_real = os.path.realpath(root)
    scan_id = scan_dir.name
    dir_is_link = os.path.islink(scan_dir)
    dir_inside = _inside(str(scan_dir), root_real)
    layout = scan_layout(scan_dir, landed_photos)
    names, known = _layout_files(scan_dir, layout, not dir_is_link and os.path.isdir(scan_dir))
    rows: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        path = scan_dir / name
        row: dict[str, Any] = {c: None for c in MANIFEST_COLUMNS}
        row.update(scan_id=scan_id, file=name, path=os.path.relpath(path, root))
        rows.append(row)
        if dir_is_link:
            # never look inside a linked scan folder
            row.update(present=True, inside_root=dir_inside, regular=False if dir_inside else None,
                       detail="scan folder is a symlink" + ("" if dir_inside else " pointing outside the data folder"))
            continue
        pixels = _inspect_file(path, name, scan_id, root_real, cfg, row, layout, known)
        if isinstance(pixels, NormalisedPhoto):
            if normalised is not None:
                normalised[scan_id] = pixels
        elif pixels is not None:
            arrays[name] = pixels
            if layout in (PHOTO, CLINIC) and name == "photo.png":
                row["content_sha256"] = pixel_sha256(pixels)
    if layout in (RENDERED, CLINIC):
        _check_maps(arrays, {r["file"]: r for r in rows}, cfg, consistency=layout == RENDERED)
    if layout == LANDED_PHOTO and rows[0]["present"] is not True:
        rows[0]["detail"] = "no JPEG or PNG photograph (.jpg, .jpeg, .png) in a folder without rendered maps"
    return rows


def content_key(row: dict[str, Any]) -> str | None:
    """What the duplicate check compares for a manifest row: ``px:<pixel sha256>`` for the photo of a
    photo-only scan, a clinic scan or a landed photograph, the file's sha256 for a rendered ``photo.png``, else None."""
    if row.get("content_sha256") is not None:
        return "px:" + row["content_sha256"]
    if row["file"] == "photo.png" and row.get("sha256") is not None:
        return row["sha256"]
    return None


def build_manifest(scan_dirs: list[Path], root: Path, cfg: ContractConfig,
                   known_scan_ids: set[str] | None = None,
                   known_photo_hashes: dict[str, str] | None = None, landed_photos: bool = False,
                   normalised: dict[str, NormalisedPhoto] | None = None) -> pd.DataFrame:
    """The manifest of ``scan_dirs`` (all under ``root``). ``known_*`` describe data already
    accepted: their ids and photo content keys (:func:`content_key`) count as taken. Within the
    batch, the first scan (by id) with a given photo keeps it; later copies are duplicates.
    ``landed_photos`` / ``normalised``: see :func:`inspect_scan` (ingestion only)."""
    known_scan_ids = known_scan_ids or set()
    seen = dict(known_photo_hashes or {})
    rows: list[dict[str, Any]] = []
    for d in sorted(scan_dirs, key=lambda p: p.name):
        scan_rows = inspect_scan(d, root, cfg, landed_photos, normalised)
        new_id = d.name not in known_scan_ids
        for r in scan_rows:
            r["scan_id_new"] = new_id
            key = content_key(r)
            if key is not None:
                owner = seen.get(key)
                r["content_unique"] = owner is None
                if owner is None:
                    seen[key] = d.name
                else:
                    r["detail"] = r["detail"] or f"same photo as scan {owner}"
        rows.extend(scan_rows)
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for col in ("width", "height", "size_bytes"):
        df[col] = df[col].astype("Int64")
    return df.astype({c: object for c in MANIFEST_COLUMNS if c not in ("width", "height", "size_bytes")})


# ----------------------------------------------------------------------- great-expectations

def _expectations(cfg: ContractConfig) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    true_set = [True]

    def must(column: str, rule: str) -> Any:
        return E.ExpectColumnValuesToBeInSet(column=column, value_set=true_set, meta={"rule": rule})

    return [
        E.ExpectColumnValuesToMatchRegex(column="scan_id", regex=SCAN_ID_PATTERN, meta={"rule": "scan_id_format"}),
        must("scan_id_new", "unique_scan_id"),
        E.ExpectCompoundColumnsToBeUnique(column_list=["scan_id", "file"], meta={"rule": "manifest_rows_unique"}),
        must("present", "required_file_present"),
        must("inside_root", "path_inside_root"),
        must("regular", "regular_file"),
        must("known", "known_file"),
        must("non_empty", "non_empty_file"),
        must("decodable", "decodable"),
        must("header_ok", "header_within_limits"),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.resolution, max_value=cfg.resolution, meta={"rule": "expected_size"}),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.resolution, max_value=cfg.resolution, meta={"rule": "expected_size"}),
        E.ExpectColumnPairValuesToBeEqual(column_A="mode", column_B="expected_mode", ignore_row_if="either_value_is_missing", meta={"rule": "expected_mode"}),
        must("labels_ok", "segmentation_labels"),
        must("normals_ok", "normal_unit_length"),
        must("depth_ok", "depth_range"),
        must("lighting_ok", "lighting_range"),
        must("meta_ok", "meta_schema"),
        must("content_unique", "unique_content"),
        must("single_frame", "single_frame"),
        must("metadata_free", "metadata_free"),
        must("photo_format_ok", "photo_format"),
        must("photo_mode_ok", "photo_mode"),
        must("photo_size_ok", "photo_size"),
    ]


def run_expectations(manifest: pd.DataFrame, cfg: ContractConfig, suite_name: str = "scan_contract") -> dict[str, Any]:
    """Validate the manifest with an ephemeral GX context; returns the result as a JSON dict."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

    project = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                                analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False))
    context = gx.get_context(mode="ephemeral", project_config=project)
    source = context.data_sources.add_pandas("manifest")
    batch_def = source.add_dataframe_asset("scan_files").add_batch_definition_whole_dataframe("all_rows")
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for exp in _expectations(cfg):
        suite.add_expectation(exp)
    vdef = context.validation_definitions.add(gx.ValidationDefinition(name=f"{suite_name}_run", data=batch_def, suite=suite))
    result = vdef.run(batch_parameters={"dataframe": manifest.reset_index(drop=True)},
                      result_format={"result_format": "COMPLETE"})
    return result.to_json_dict()


def validate(manifest: pd.DataFrame, cfg: ContractConfig) -> ValidationOutcome:
    """Run the expectations and turn unexpected rows into per-scan violations."""
    manifest = manifest.reset_index(drop=True)
    report = run_expectations(manifest, cfg)
    violations: dict[str, list[Violation]] = {}
    seen: set[tuple[str, str, str]] = set()
    for res in report["results"]:
        if res["success"]:
            continue
        rule = res["expectation_config"]["meta"]["rule"]
        indices = res["result"].get("unexpected_index_list")
        if indices is None:
            raise ContractError(f"expectation for rule {rule} failed without row indices: {res['result']}")
        for idx in indices:
            row = manifest.iloc[int(idx)]
            file = "." if rule in SCAN_RULES else row["file"]  # scan-level rules: report once
            key = (row["scan_id"], file, rule)
            if key in seen:
                continue
            seen.add(key)
            detail = row["detail"] or RULES.get(rule, rule)
            if rule == "scan_id_format":
                detail = f"scan id {row['scan_id']!r} does not match {SCAN_ID_PATTERN}"
            elif rule == "unique_scan_id":
                detail = f"scan id {row['scan_id']!r} is already in the accepted data"
            violations.setdefault(row["scan_id"], []).append(
                Violation(scan_id=row["scan_id"], file=file, rule=rule, detail=str(detail)))
    valid = sorted(set(manifest["scan_id"]) - set(violations))
    for v in violations.values():
        v.sort(key=lambda x: (x.file, x.rule))
    return ValidationOutcome(manifest=manifest, violations=violations, report=report, valid_scans=valid)


def summary_report(outcome: ValidationOutcome) -> dict[str, Any]:
    """A compact JSON report: per-rule statistics, the violations, and the full GX result."""
    stats = []
    for res in outcome.report["results"]:
        r = res["result"]
        stats.append({
            "rule": res["expectation_config"]["meta"]["rule"],
            "expectation": res["expectation_config"]["type"],
            "kwargs": {k: v for k, v in res["expectation_config"]["kwargs"].items() if k != "batch_id"},
            "success": res["success"],
            "element_count": r.get("element_count"),
            "unexpected_count": r.get("unexpected_count"),
        })
    return {
        "success": outcome.success,
        "scans": int(outcome.manifest["scan_id"].nunique()),
        "rows": int(len(outcome.manifest)),
        "valid_scans": len(outcome.valid_scans),
        "rules": RULES,
        "expectations": stats,
        "violations": {sid: [v.as_dict() for v in vs] for sid, vs in sorted(outcome.violations.items())},
        "great_expectations": {"success": outcome.report["success"], "statistics": outcome.report["statistics"]},
    }
