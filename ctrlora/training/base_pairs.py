"""Which training pairs the shared Base ControlNet trains on, declared by content.

The base is the expensive, shared part of the model (about three times an adapter's training on
the default data); the per-condition adapters are cheap. A clinic that lands a few dozen scans
should get adapters retrained on them at once, not a new base every time. So the base trains on
a *recorded* list of training scans, refreshed to the whole training split only when that split
has grown by ``refresh_growth`` (a share of the recorded list) or when anything recorded changed:

* the record holds, per scan, the content keys of its embed rows (sha256 of the prepared photo
  PNG and of each base condition's PNG, sha256 of the caption) and the backbone that encoded them,
  so it determines the base's input completely: the base's DVC stage depends on the record, not on
  the whole embed cache, and new rows beyond the record do not rerun it;
* :func:`restrict` hands the base trainer a view of the embed cache in which only the recorded
  scans form the training split, after checking every recorded row is still there with the same
  keys. A record that covers the whole split (every fresh build) changes nothing: the view is the
  cache itself, so the base is exactly what training on the whole split gives.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ctrlora.training.embed import EmbedCache

RECORD_VERSION = 1
UNLISTED = "train_unlisted"  # the split a training scan outside the record gets in the base's view


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def training_rows(index: dict[str, Any], keys: dict[str, Any], photo_index: dict[str, list[int]],
                  conditions: list[str]) -> dict[str, dict[str, Any]]:
    """``{scan id: {"photo": sha, "caption": sha, "conditions": {c: sha}}}`` of the training split
    of an embed cache (``index``: its index.json; ``keys``: its content keys, photos[i] for photo
    row i and conditions[c][j] for condition c's row j; ``photo_index[c][j]``: the photo row of
    condition c's row j; ``conditions``: the base's)."""
    if len(keys["photos"]) != len(index["scan_ids"]):
        raise ValueError(f"embed keys list {len(keys['photos'])} photos for a cache of {len(index['scan_ids'])}")
    rows: dict[str, dict[str, Any]] = {}
    for i, (scan, split) in enumerate(zip(index["scan_ids"], index["splits"])):
        if split == "train":
            rows[scan] = {"photo": keys["photos"][i], "caption": _sha(index["captions"][i]), "conditions": {}}
    by_row = {i: scan for i, scan in enumerate(index["scan_ids"])}
    for c in conditions:
        if c not in keys["conditions"] or c not in photo_index:
            raise KeyError(f"condition {c!r} is not in the embed cache (or has no content keys)")
        if len(keys["conditions"][c]) != len(photo_index[c]):
            raise ValueError(f"embed keys list {len(keys['conditions'][c])} rows of {c!r}, the cache {len(photo_index[c])}")
        for j, i in enumerate(photo_index[c]):
            scan = by_row[int(i)]
            if scan in rows:
                rows[scan]["conditions"][c] = keys["conditions"][c][j]
    return rows


def record_of(rows: dict[str, dict[str, Any]], backbone_hash: str, conditions: list[str]) -> dict[str, Any]:
    return {"version": RECORD_VERSION, "backbone_hash": backbone_hash, "conditions": sorted(conditions),
            "scans": rows}


def decide(previous: dict[str, Any] | None, current: dict[str, Any], refresh_growth: float) -> tuple[dict[str, Any], str]:
    """The record the base trains on next, and why: ``previous`` is kept while every scan it lists
    is still in the training split with the same keys, the backbone and conditions are the same,
    and the scans it does not list are fewer than ``refresh_growth`` × its size; else ``current``."""
    if refresh_growth < 0:
        raise ValueError(f"refresh_growth must be >= 0, got {refresh_growth}")
    if previous is None:
        return current, "no previous record: the whole training split"
    if previous.get("version") != RECORD_VERSION:
        return current, f"previous record has version {previous.get('version')}: the whole training split"
    if previous["backbone_hash"] != current["backbone_hash"]:
        return current, "another backbone: the whole training split"
    if previous["conditions"] != current["conditions"]:
        return current, f"base conditions changed {previous['conditions']} -> {current['conditions']}"
    old, now = previous["scans"], current["scans"]
    changed = [s for s in old if now.get(s) != old[s]]
    if changed:
        return current, f"{len(changed)} recorded scan(s) changed or left the training split"
    new = len(set(now) - set(old))
    growth = new / max(1, len(old))
    if new and growth >= refresh_growth:
        return current, f"{new} new training scan(s), growth {growth:.1%} >= {refresh_growth:.0%}"
    return previous, (f"kept: {new} new training scan(s), growth {growth:.1%} < {refresh_growth:.0%} "
                      "(adapters train on them; the base waits)")


def write_record(record: dict[str, Any], path: str | Path) -> bool:
    """Write ``record`` to ``path`` unless the file already holds exactly it (its bytes, and so its
    DVC hash, stay untouched); True when written."""
    path = Path(path)
    text = json.dumps(record, sort_keys=True, indent=1) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def read_record(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def restrict(cache: EmbedCache, index: dict[str, Any], keys: dict[str, Any], record: dict[str, Any],
             backbone_hash: str) -> EmbedCache:
    """``cache`` with only the scans of ``record`` in its training split (others get
    :data:`UNLISTED`); the cache itself when the record covers the whole split. Raises when a
    recorded scan is missing or its rows differ (the record is stale: rerun its stage)."""
    conditions = list(record["conditions"])
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"base pair record has version {record.get('version')}, expected {RECORD_VERSION}")
    if record["backbone_hash"] != backbone_hash:
        raise ValueError("the base pair record was made for another backbone: rerun `dvc repro base_pairs`")
    photo_index = {c: cache.conditions[c].photo_index.tolist() for c in conditions if c in cache.conditions}
    rows = training_rows(index, keys, photo_index, conditions)
    stale = [s for s, r in record["scans"].items() if rows.get(s) != r]
    if stale:
        raise ValueError(f"{len(stale)} scan(s) of the base pair record are not in the embed cache with the "
                         f"recorded content (first: {stale[0]}): rerun `dvc repro base_pairs`")
    if len(rows) == len(record["scans"]):
        return cache
    listed = set(record["scans"])
    splits = [UNLISTED if sp == "train" and scan not in listed else sp
              for scan, sp in zip(cache.scan_ids, cache.splits)]
    return replace(cache, splits=splits)
