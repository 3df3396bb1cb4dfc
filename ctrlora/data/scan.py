"""One scan on disk: the file layout of docs/CONTRACTS.md, reading and (atomic) writing."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctrlora.data.files import png_bytes, read_png

SCAN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
READY = "READY"
META = "meta.json"
# image file -> PIL mode
IMAGE_FILES: dict[str, str] = {
    "photo.png": "RGB",
    "segmentation.png": "L",
    "lighting.png": "L",
    "normal.png": "RGB",
    "depth.png": "L",
}
REQUIRED_FILES: tuple[str, ...] = (*IMAGE_FILES, META, READY)


@dataclass
class Scan:
    """A scan's images as uint8 arrays. Rendered maps are optional: a real photograph folder has
    only ``photo`` (the derived conditions need nothing else)."""

    scan_id: str
    photo: np.ndarray  # H×W×3 uint8
    segmentation: np.ndarray | None = None  # H×W uint8 label ids
    lighting: np.ndarray | None = None  # H×W uint8
    normal: np.ndarray | None = None  # H×W×3 uint8, (n + 1) / 2 * 255
    depth: np.ndarray | None = None  # H×W uint8, 255 nearest, 0 background
    meta: dict[str, Any] = field(default_factory=dict)

    def require(self, name: str) -> np.ndarray:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"scan {self.scan_id}: the {name!r} map is required but absent")
        return value


def meta_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, sort_keys=True, indent=1) + "\n").encode("utf-8")


def write_scan(scan: Scan, root: Path) -> Path:
    """Write ``root/<scan_id>/`` atomically: the files go to a temporary sibling folder, ``READY``
    is written last, then the folder is renamed into place. Refuses to overwrite."""
    root = Path(root)
    final = root / scan.scan_id
    if final.exists():
        raise FileExistsError(f"{final}: scan folder already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{scan.scan_id}-", dir=root))
    try:
        for name, mode in IMAGE_FILES.items():
            (tmp / name).write_bytes(png_bytes(scan.require(name[:-4]), mode))
        (tmp / META).write_bytes(meta_bytes(scan.meta))
        (tmp / READY).write_bytes(b"")
        os.chmod(tmp, 0o755)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_scan(folder: Path, *, rendered: bool = True) -> Scan:
    """Read a scan folder (validated beforehand by :mod:`ctrlora.data.contract`)."""
    folder = Path(folder)
    meta_path = folder / META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    kwargs: dict[str, Any] = {"photo": read_png(folder / "photo.png", "RGB")}
    if rendered:
        for name, mode in IMAGE_FILES.items():
            if name != "photo.png":
                kwargs[name[:-4]] = read_png(folder / name, mode)
    return Scan(scan_id=folder.name, meta=meta, **kwargs)
