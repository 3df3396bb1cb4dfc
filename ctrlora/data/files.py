"""Image files and digests: PNG reading and writing, file content hashes, atomic folder swap.

Every PNG the project reads (scans, prepared pairs, evaluation inputs) goes through
:func:`read_png`, every PNG it writes through :func:`png_bytes`, and every file digest through
:func:`file_digest` (:func:`sha256_file`, :func:`md5_file`).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CHUNK = 1 << 20


# ---------------------------------------------------------------------- PNG
def read_png(path: str | Path, mode: str | None = None, *, convert: bool = False) -> np.ndarray:
    """The image at ``path`` as a uint8 array (H×W for ``"L"``, H×W×3 for ``"RGB"``).

    ``mode``: the PIL mode the file must have; a file of another mode raises ``ValueError`` naming
    the file, its mode and the expected one -- or, with ``convert=True``, is converted to
    ``mode`` (e.g. any image read as RGB). ``None`` returns the file's own mode."""
    path = Path(path)
    try:
        im = Image.open(path)
    except UnidentifiedImageError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    with im:
        if mode is not None and im.mode != mode:
            if not convert:
                raise ValueError(f"{path}: mode {im.mode}, expected {mode}")
            im = im.convert(mode)
        return np.asarray(im).copy()


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    """Encode a uint8 array as PNG in PIL mode ``mode`` (deterministic: no timestamps, fixed
    compression level), so the same array always gives the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------- digests
def update_from_file(h, path: str | Path) -> None:
    """Feed a file's bytes into the hash object ``h``, in chunks."""
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    h = hashlib.new(algorithm)
    update_from_file(h, path)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def md5_file(path: str | Path) -> str:
    return file_digest(path, "md5")


# ---------------------------------------------------------------------- folders
def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an old ``out`` is moved aside first and
    removed last (a crash in between leaves the old data in ``.<name>.old-*`` and the new in
    ``tmp``, never a mix)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
