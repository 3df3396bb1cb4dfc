"""The one reader of ``dvc.lock``: the hashes DVC recorded for the graph's outputs.

A data set's identity in the registry is the hash DVC stores its folder under (what ``dvc
checkout`` / ``dvc pull`` restore it by), so it is read from ``dvc.lock`` rather than recomputed.

The lock also says what the last complete run covered (:func:`uncovered`): DVC writes a stage's
entry only when that stage succeeded, so a run that stopped part-way leaves a stage whose recorded
input differs from what its producer, or the accepted store, now holds.
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


def _value(item: dict) -> str | None:
    """The hash of one lock item (md5 in DVC 3; other hash names and cloud etags as recorded)."""
    value = item.get("md5") or item.get(item.get("hash", "md5")) or item.get("etag")
    return str(value) if value else None


def _entries(lock: dict) -> Iterator[tuple[str, str, str]]:
    """(kind ``outs``/``deps``, normalised path, hash) of every hashed item of every stage."""
    for entry in (lock.get("stages") or {}).values():
        for kind in ("outs", "deps"):
            for item in entry.get(kind) or []:
                value = _value(item)
                if value:
                    yield kind, _norm(item.get("path", "")), value


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


def dep_hashes(repo_root: str | Path, path: str) -> dict[str, str]:
    """``{stage: hash}`` of every stage that records ``path`` as a dependency (``{}`` without a
    dvc.lock)."""
    want = _norm(path)
    out: dict[str, str] = {}
    for stage, entry in ((read_lock(repo_root) or {}).get("stages") or {}).items():
        for item in entry.get("deps") or []:
            value = _value(item)
            if value and _norm(item.get("path", "")) == want:
                out[stage] = value
    return out


def stale_deps(repo_root: str | Path) -> list[dict[str, str]]:
    """Dependencies a stage recorded with another hash than the stage producing them recorded for
    that output: the consumer last ran on older data than its producer now holds, i.e. the run
    that produced it stopped before reaching the consumer (it failed or was interrupted). Only
    exact path matches are compared (a dependency inside another stage's output folder is not)."""
    stages = (read_lock(repo_root) or {}).get("stages") or {}
    produced: dict[str, tuple[str, str]] = {}
    for stage, entry in stages.items():
        for item in entry.get("outs") or []:
            value = _value(item)
            if value:
                produced[_norm(item.get("path", ""))] = (stage, value)
    stale = []
    for stage, entry in stages.items():
        for item in entry.get("deps") or []:
            path = _norm(item.get("path", ""))
            value = _value(item)
            if value and path in produced and produced[path][1] != value:
                producer, now = produced[path]
                stale.append({"stage": stage, "path": path, "recorded": value,
                              "producer": producer, "produced": now})
    return stale


def uncovered(repo_root: str | Path, store: str, store_hash: str | None,
              store_has_data: bool) -> list[str]:
    """Why the last complete run of the graph does not cover the accepted store ``store`` whose
    current DVC hash is ``store_hash`` (None: the folder does not exist); ``[]`` when it does.

    Covered means: every stage that depends on the store recorded its current hash, and no stage
    recorded an older hash of a dependency than its producer did (:func:`stale_deps`). Scans that
    an interrupted retrain ingested, or ingested and prepared before a later stage failed, leave
    one of the two behind. ``store_has_data``: the store holds scans (without a dvc.lock, scans in
    the store were never trained on)."""
    lock_file = Path(repo_root) / LOCK_FILE
    if read_lock(repo_root) is None:
        return [f"{lock_file} does not exist yet and {store}/ holds scans: they were never trained on"] \
            if store_has_data else []
    reasons = []
    if store_hash is not None:
        for stage, recorded in sorted(dep_hashes(repo_root, store).items()):
            if recorded != store_hash:
                reasons.append(f"stage {stage} last ran on {_norm(store)} {recorded}; "
                               f"it now hashes {store_hash}")
    for s in stale_deps(repo_root):
        reasons.append(f"stage {s['stage']} last ran on {s['path']} {s['recorded']}; stage "
                       f"{s['producer']} has since produced {s['produced']}")
    return reasons
