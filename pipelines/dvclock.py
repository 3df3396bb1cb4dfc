"""The one reader of ``dvc.lock``: the hashes DVC recorded for the graph's outputs.

A data set's identity in the registry is the hash DVC stores its folder under (what ``dvc
checkout`` / ``dvc pull`` restore it by), so it is read from ``dvc.lock`` rather than recomputed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import yaml

from pipelines.settings import PREPARED_CONDITIONS

LOCK_FILE = "dvc.lock"


def _norm(path: str) -> str:
    p = str(path).replace("\\", "/").strip()
    while p.startswith("./"):
        p = p[2:]
    return p.rstrip("/")


def _entries(lock: dict) -> Iterator[tuple[str, str, str]]:
    """(kind ``outs``/``deps``, normalised path, hash) of every hashed item of every stage."""
    for entry in (lock.get("stages") or {}).values():
        for kind in ("outs", "deps"):
            for item in entry.get(kind) or []:
                value = item.get("md5") or item.get(item.get("hash", "md5")) or item.get("etag")
                if value:
                    yield kind, _norm(item.get("path", "")), str(value)


def read_lock(repo_root: str | Path) -> dict | None:
    """The parsed ``dvc.lock`` of the repo at ``repo_root``; None when there is none yet."""
    lock_file = Path(repo_root) / LOCK_FILE
    if not lock_file.is_file():
        return None
    return yaml.safe_load(lock_file.read_text()) or {}


def lock_hash(repo_root: str | Path, path: str) -> str:
    """The hash DVC recorded for ``path``: as the out of some stage, else as a dependency."""
    lock_file = Path(repo_root) / LOCK_FILE
    lock = read_lock(repo_root)
    if lock is None:
        raise FileNotFoundError(f"{lock_file}: no dvc.lock (run `dvc repro` first)")
    want = _norm(path)
    as_dep = None
    for kind, item_path, value in _entries(lock):
        if item_path != want:
            continue
        if kind == "outs":
            return value
        as_dep = as_dep or value
    if as_dep:
        return as_dep
    raise KeyError(f"{lock_file}: no stage records {want!r} (outs or deps); "
                   f"stages present: {sorted(lock.get('stages') or {})}")


def dataset_hash_from_lock(repo_root: str | Path, condition: str) -> str:
    """DVC's hash of ``data/prepared/conditions/<condition>``: the condition's data set."""
    return lock_hash(repo_root, f"{PREPARED_CONDITIONS}/{condition}")


def dataset_hashes(repo_root: str | Path) -> dict[str, str]:
    """``{condition: hash}`` of every prepared condition folder some stage outputs; ``{}``
    before the first ``dvc repro``."""
    lock = read_lock(repo_root)
    prefix = PREPARED_CONDITIONS + "/"
    out: dict[str, str] = {}
    for kind, path, value in _entries(lock or {}):
        if kind == "outs" and path.startswith(prefix) and "/" not in path[len(prefix):]:
            out[path[len(prefix):]] = value
    return out
