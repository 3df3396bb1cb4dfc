"""Bring an embed cache up to date by encoding only what changed.

A retrain after new scans land used to re-encode every photograph, condition image and caption
(about a minute on two CPU cores for the default data set) although only the new scans' rows are
new. The frozen VAE and text encoder are deterministic functions of one image or one caption, so
a row can be reused whenever its input is byte-identical to one encoded before with the same
backbone. Reuse is keyed by content, never by scan id or position:

* a photograph row by the sha256 of its prepared PNG (``pairs.jsonl`` ``photo_sha256``);
* a condition row by the sha256 of its prepared condition PNG, per condition;
* a caption by its text.

The updated cache has the layout, row order and dtypes of a fresh
:func:`ctrlora.training.embed.build_embed_cache` over the same prepared data; where the encoders
give the same bits for an image whatever batch it sits in (measured so on CPU), its bytes are
those of a fresh build too. The keys live in a small JSON file beside the cache
(:func:`save_keys`), which also records the sha256 of the cache files it describes, so keys that
no longer match the cache on disk (a restored older cache, an interrupted write) are ignored and
everything is encoded afresh.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import numpy as np

from ctrlora.data.files import read_png, sha256_file
from ctrlora.data.pairs import SPLITS, read_pairs
from ctrlora.models.latents import encode_posterior, encode_text
from ctrlora.training.embed import ConditionEmbeds, EmbedCache, build_embed_cache, load_embed_cache

log = logging.getLogger(__name__)

KEYS_VERSION = 1
_CACHE_FILES = ("index.json", "photos.safetensors", "text.safetensors")


@dataclass
class EmbedKeys:
    """Content keys of a cache's rows: ``photos[i]`` is the sha256 of photo row i's PNG,
    ``conditions[c][j]`` of condition c's row j; ``backbone_hash`` the encoders'."""

    backbone_hash: str
    photos: list[str]
    conditions: dict[str, list[str]]


@dataclass
class UpdateReport:
    photos_reused: int = 0
    photos_encoded: int = 0
    conditions_reused: int = 0
    conditions_encoded: int = 0
    captions_reused: int = 0
    captions_encoded: int = 0
    previous: str = "none"  # none | used | ignored: <why>

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _cache_digest(cache_dir: Path, conditions: list[str]) -> dict[str, str]:
    files = [*_CACHE_FILES, *(f"conditions/{c}.safetensors" for c in sorted(conditions))]
    return {f: sha256_file(cache_dir / f) for f in files}


def save_keys(keys: EmbedKeys, cache_dir: str | Path, path: str | Path) -> None:
    """Write ``keys`` for the cache saved in ``cache_dir`` (whose files' sha256 it records)."""
    cache_dir, path = Path(cache_dir), Path(path)
    doc = {"version": KEYS_VERSION, "backbone_hash": keys.backbone_hash, "photos": keys.photos,
           "conditions": keys.conditions, "cache_sha256": _cache_digest(cache_dir, list(keys.conditions))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=0) + "\n")
    tmp.replace(path)


def read_keys(cache_dir: str | Path, keys_path: str | Path) -> dict[str, Any]:
    """The content keys of the cache in ``cache_dir``, checked against its files' sha256; raises
    when they do not describe that cache (rerun the ``embed`` stage)."""
    cache_dir, keys_path = Path(cache_dir), Path(keys_path)
    if not keys_path.is_file():
        raise FileNotFoundError(f"{keys_path}: no embed keys; run the `embed` stage first")
    doc = json.loads(keys_path.read_text())
    if doc.get("version") != KEYS_VERSION:
        raise ValueError(f"{keys_path} has version {doc.get('version')}, not {KEYS_VERSION}: rerun the `embed` stage")
    if _cache_digest(cache_dir, list(doc["conditions"])) != doc["cache_sha256"]:
        raise ValueError(f"{keys_path} does not describe the cache in {cache_dir}: rerun the `embed` stage")
    return doc


def load_previous(cache_dir: str | Path, keys_path: str | Path,
                  backbone_hash: str) -> tuple[EmbedCache | None, EmbedKeys | None, str]:
    """The cache in ``cache_dir`` and its keys when both exist, agree with each other and were
    made by the backbone ``backbone_hash``; else ``(None, None, why)``."""
    cache_dir, keys_path = Path(cache_dir), Path(keys_path)
    if not (cache_dir / "index.json").is_file() or not keys_path.is_file():
        return None, None, "none"
    try:
        doc = json.loads(keys_path.read_text())
        if doc.get("version") != KEYS_VERSION:
            return None, None, f"ignored: {keys_path} has version {doc.get('version')}, not {KEYS_VERSION}"
        if doc["backbone_hash"] != backbone_hash:
            return None, None, "ignored: the cache was made by another backbone"
        conditions = {str(c): list(v) for c, v in doc["conditions"].items()}
        if _cache_digest(cache_dir, list(conditions)) != doc["cache_sha256"]:
            return None, None, f"ignored: {cache_dir} is not the cache {keys_path} describes"
        cache = load_embed_cache(cache_dir, list(conditions))
    except (OSError, KeyError, ValueError) as e:  # unreadable or half-written: start afresh
        return None, None, f"ignored: {e}"
    keys = EmbedKeys(doc["backbone_hash"], list(doc["photos"]), conditions)
    if len(keys.photos) != len(cache.scan_ids) or any(
            len(keys.conditions[c]) != len(cache.conditions[c].photo_index) for c in conditions):
        return None, None, f"ignored: {keys_path} does not match the rows of {cache_dir}"
    return cache, keys, "used"


@torch.no_grad()
def update_embed_cache(vae, text_encoder, tokenizer, prepared_root: str | Path, conditions: list[str],
                       backbone_hash: str, previous: EmbedCache | None = None,
                       previous_keys: EmbedKeys | None = None, batch_size: int = 128,
                       progress: bool = True) -> tuple[EmbedCache, EmbedKeys, UpdateReport]:
    """The cache :func:`~ctrlora.training.embed.build_embed_cache` would build over
    ``prepared_root``, reusing every row of ``previous`` whose input is unchanged; with no
    previous cache every row is encoded."""
    root = Path(prepared_root)
    report = UpdateReport(previous="used" if previous is not None else "none")
    old_photo = {k: i for i, k in enumerate(previous_keys.photos)} if previous_keys else {}
    old_caption = {c: i for i, c in enumerate(previous.captions)} if previous is not None else {}

    # 1. the row plan, in build_embed_cache's order: per condition, its pairs split by split;
    #    a photograph's row is made where its scan first appears
    photo_rows: dict[str, int] = {}
    scan_ids: list[str] = []
    splits: list[str] = []
    captions: list[str] = []
    photo_keys: list[str] = []
    photo_src: list[tuple[str, int]] = []  # per photo row: ("old", row) or ("new", pair position)
    plans: dict[str, tuple[list[int], list[str], list[dict[str, Any]]]] = {}
    for name in conditions:
        rows = [r for split in SPLITS for r in read_pairs(root, name, split)]
        if not rows:
            raise ValueError(f"{root}: condition {name!r} has no pairs")
        idx, ckeys = [], []
        for r in rows:
            sid = r["scan_id"]
            if sid not in photo_rows:
                photo_rows[sid] = len(scan_ids)
                scan_ids.append(sid)
                splits.append(r["split"])
                captions.append(r["caption"])
                photo_keys.append(r["photo_sha256"])
                old = old_photo.get(r["photo_sha256"])
                photo_src.append(("old", old) if old is not None else ("new", 0))
            idx.append(photo_rows[sid])
            ckeys.append(sha256_file(root / r["condition"]))
        plans[name] = (idx, ckeys, rows)

    keys = EmbedKeys(backbone_hash, photo_keys, {n: plans[n][1] for n in conditions})
    if previous is None:
        # nothing to reuse: the library's own build, so a first run is exactly what it always was
        cache = build_embed_cache(vae, text_encoder, tokenizer, root, conditions, batch_size=batch_size,
                                  progress=progress)
        if cache.scan_ids != scan_ids:
            raise RuntimeError(f"{root}: the embed cache's photo rows differ from the planned order")
        n_pairs = sum(len(plans[n][0]) for n in conditions)
        report.photos_encoded, report.conditions_encoded = len(scan_ids), n_pairs
        report.captions_encoded = len(captions)
        return cache, keys, report

    # 2. photographs: reuse or encode (new ones in batches)
    new_photos = [i for i, (kind, _) in enumerate(photo_src) if kind == "new"]
    photo_mean: list[torch.Tensor | None] = [None] * len(scan_ids)
    photo_logvar: list[torch.Tensor | None] = [None] * len(scan_ids)
    for i, (kind, old) in enumerate(photo_src):
        if kind == "old":
            assert previous is not None
            photo_mean[i], photo_logvar[i] = previous.photo_mean[old], previous.photo_logvar[old]
    photo_file: dict[str, str] = {}
    for name, (_, _, rows) in plans.items():
        for r in rows:
            photo_file.setdefault(r["scan_id"], r["photo"])
    for start in tqdm(range(0, len(new_photos), batch_size), desc="embed photos (new)", disable=not progress):
        chunk = new_photos[start:start + batch_size]
        imgs = torch.stack([_read(root, photo_file[scan_ids[i]], photo=True) for i in chunk])
        mean, logvar = encode_posterior(vae, imgs, batch_size=None)
        for j, i in enumerate(chunk):
            photo_mean[i], photo_logvar[i] = mean[j], logvar[j]
    report.photos_encoded, report.photos_reused = len(new_photos), len(scan_ids) - len(new_photos)

    # 3. condition images, per condition
    per_cond: dict[str, ConditionEmbeds] = {}
    for name, (idx, ckeys, rows) in plans.items():
        old_rows = ({k: j for j, k in enumerate(previous_keys.conditions[name])}
                    if previous_keys is not None and name in previous_keys.conditions else {})
        means: list[torch.Tensor | None] = [None] * len(rows)
        logvars: list[torch.Tensor | None] = [None] * len(rows)
        todo = []
        for j, k in enumerate(ckeys):
            if k in old_rows:
                assert previous is not None
                ce = previous.conditions[name]
                means[j], logvars[j] = ce.mean[old_rows[k]], ce.logvar[old_rows[k]]
            else:
                todo.append(j)
        for start in tqdm(range(0, len(todo), batch_size), desc=f"embed {name} (new)", disable=not progress):
            chunk = todo[start:start + batch_size]
            imgs = torch.stack([_read(root, rows[j]["condition"], photo=False) for j in chunk])
            mean, logvar = encode_posterior(vae, imgs, batch_size=None)
            for t, j in enumerate(chunk):
                means[j], logvars[j] = mean[t], logvar[t]
        report.conditions_encoded += len(todo)
        report.conditions_reused += len(rows) - len(todo)
        per_cond[name] = ConditionEmbeds(torch.tensor(idx, dtype=torch.long),
                                         torch.stack(means), torch.stack(logvars))  # type: ignore[arg-type]

    # 4. captions
    todo_caps = sorted({c for c in captions if c not in old_caption})
    fresh = dict(zip(todo_caps, encode_text(text_encoder, tokenizer, todo_caps, batch_size))) if todo_caps else {}
    text = torch.stack([fresh[c] if c in fresh else previous.text[old_caption[c]]
                        for c in captions])
    report.captions_encoded = sum(c in fresh for c in captions)
    report.captions_reused = len(captions) - report.captions_encoded
    empty = previous.empty_text if previous is not None else encode_text(text_encoder, tokenizer, [""])

    cache = EmbedCache(scan_ids, splits, captions, float(vae.config.scaling_factor),
                       torch.stack(photo_mean), torch.stack(photo_logvar), text, empty,  # type: ignore[arg-type]
                       per_cond)
    return cache, keys, report


def _read(root: Path, rel: str, photo: bool) -> torch.Tensor:
    """One prepared image exactly as :class:`~ctrlora.data.pairs.PairDataset` feeds it to the VAE
    (the same numpy arithmetic, so the same bits)."""
    img = read_png(root / rel, "RGB").astype(np.float32).transpose(2, 0, 1)
    return torch.from_numpy(img / 127.5 - 1.0 if photo else img / 255.0)


__all__ = ["EmbedKeys", "UpdateReport", "update_embed_cache", "load_previous", "save_keys"]
