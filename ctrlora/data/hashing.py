"""Content hashes of prepared data sets, identical to the ones DVC records.

DVC 3 hashes a file as the md5 of its bytes, and a directory as the md5 of the JSON listing of its
files — ``json.dumps(sorted([{"md5": ..., "relpath": ...}], key=relpath), sort_keys=True)`` with
json's default separators, UTF-8 — followed by the suffix ``.dir`` (see
``dvc_data.hashfile.tree.Tree.as_bytes`` / ``digest``). So the hash below is the ``md5`` that
``dvc.lock`` holds for an output directory, and DVC can restore that exact data from its cache by
it. It is independent of file creation order and changes with any byte of any file or any name.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ctrlora.data.files import md5_file


def dir_listing(folder: Path) -> list[dict[str, str]]:
    folder = Path(folder)
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            entries.append({"md5": md5_file(path), "relpath": rel})
    return sorted(entries, key=lambda e: e["relpath"])


def dvc_dir_md5(folder: Path) -> str:
    """DVC's md5 of a directory (``<32 hex>.dir``)."""
    if not Path(folder).is_dir():
        raise NotADirectoryError(f"{folder}: not a directory")
    payload = json.dumps(dir_listing(folder), sort_keys=True).encode("utf-8")
    return hashlib.md5(payload).hexdigest() + ".dir"
