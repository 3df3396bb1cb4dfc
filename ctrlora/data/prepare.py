"""Build ``data/prepared/`` (layout in docs/CONTRACTS.md) from validated scan folders.

Every input scan is validated against the contract first; ``prepare`` is strict — any violation
stops it with a :class:`ContractError` naming the scans, files and rules (bad *incoming* scans are
the ingestion's business: they never reach the accepted store). The output is built in a
temporary sibling folder and renamed into place when complete.

A photo-only scan (a clinic photograph, see :mod:`ctrlora.data.photos`) gains the derived
conditions only; the rendered-only ones (segmentation, lighting, normal, depth) have no image and
no pair row for it. Its caption is :data:`ctrlora.data.photos.PHOTO_CAPTION`. A clinic scan
(:mod:`ctrlora.data.clinic`) gains the derived conditions plus those of the maps it carries, and
its caption is the one its meta.json records.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ctrlora.data.captions import caption_from_meta
from ctrlora.data.conditions import CONDITIONS, encode_u8
from ctrlora.data.contract import (CLINIC, PHOTO, RENDERED, ContractConfig, ContractError, build_manifest, clinic_map_names,
                                   clinic_meta, scan_layout, summary_report, validate)
from ctrlora.data.files import png_bytes, read_png, swap_into_place
from ctrlora.data.hashing import dvc_dir_md5
from ctrlora.data.ingest import pending_journal
from ctrlora.data.photos import PHOTO_CAPTION
from ctrlora.data.scan import IMAGE_FILES, load_scan


@dataclass(frozen=True)
class PrepareConfig:
    sources: tuple[Path, ...]  # folders of scan folders (e.g. data/rendered, data/scans); absent ones are skipped
    out: Path  # data/prepared
    data_root: Path  # the data folder: every input path must stay inside it
    test_fraction: float = 0.1
    validation_fraction: float = 0.1
    conditions: tuple[str, ...] = field(default_factory=lambda: tuple(CONDITIONS))  # the params file's table
    contract: ContractConfig = ContractConfig()
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0 - self.test_fraction:
            raise ValueError(f"validation_fraction must be in [0, 1 - test_fraction), got {self.validation_fraction}")
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"unknown conditions {unknown}; known: {list(CONDITIONS)}")

    @classmethod
    def from_params(cls, section: Mapping[str, Any], *, sources: Sequence[str | Path], out: str | Path,
                    data_root: str | Path) -> "PrepareConfig":
        """From params.yaml ``prepare`` (every key stated there; unknown or missing keys refused)
        and the folders, which params ``paths`` states."""
        from ctrlora.params import checked_section

        p = checked_section("prepare", section, ("resolution", "test_fraction", "validation_fraction", "conditions",
                                                 "workers"))
        return cls(sources=tuple(Path(s) for s in sources), out=Path(out), data_root=Path(data_root),
                   test_fraction=float(p["test_fraction"]), validation_fraction=float(p["validation_fraction"]),
                   conditions=tuple(p["conditions"]), contract=ContractConfig(resolution=int(p["resolution"])),
                   workers=int(p["workers"]))


@dataclass
class PrepareResult:
    out: Path
    scans: int
    train: int
    validation: int
    test: int
    hashes: dict[str, str]
    seconds: float
    sources: dict[str, int] = field(default_factory=dict)


SPLIT_RULE = ("u = sha256('ctrlora-split:' + id)[:8] / 2**64; test if u < test_fraction, "
              "validation if u < test_fraction + validation_fraction, else train")


def split_of(scan_id: str, test_fraction: float, validation_fraction: float = 0.0) -> str:
    """Deterministic split from the scan id alone (stable when scans are added or removed).

    Test is carved first, so adding a validation split never moves a scan into or out of test;
    validation is then taken from what was train (every choice of defaults is made there)."""
    digest = hashlib.sha256(f"ctrlora-split:{scan_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


def _scan_dirs(sources: tuple[Path, ...]) -> tuple[list[Path], dict[str, int]]:
    dirs: list[Path] = []
    counts: dict[str, int] = {}
    owner: dict[str, Path] = {}
    for src in sources:
        src = Path(src)
        if not src.is_dir():
            counts[str(src)] = 0
            continue
        found = [src / n for n in sorted(os.listdir(src)) if not n.startswith(".")]
        counts[str(src)] = len(found)
        for d in found:
            if d.name in owner:
                raise ContractError(f"rule unique_scan_id: scan id {d.name!r} is in both {owner[d.name]} and {src}")
            owner[d.name] = src
        dirs.extend(found)
    return dirs, counts


def conditions_of(layout: str, conditions: tuple[str, ...], maps: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The conditions a scan of ``layout`` has: all for a rendered scan, the derived ones for a
    photo-only scan, the derived ones and those of its ``maps`` for a clinic scan."""
    if layout == RENDERED:
        return tuple(conditions)
    return tuple(c for c in conditions if CONDITIONS[c].source == "derived" or (layout == CLINIC and c in maps))


def _write_scan_outputs(job: tuple[str, str, str, tuple[str, ...], str]) -> tuple[str, str, str, tuple[str, ...]]:
    """Copy the photo and write every encoded condition of one scan.
    Returns (id, photo sha, caption, the conditions written)."""
    scan_dir, tmp_out, _split, conditions, layout = job
    photo_only = layout == PHOTO
    clinic = layout == CLINIC
    scan = load_scan(Path(scan_dir), rendered=not (photo_only or clinic))
    if clinic:  # only the maps it carries: the rendered conditions of ``conditions`` (see conditions_of)
        for c in conditions:
            if CONDITIONS[c].source == "rendered":
                setattr(scan, c, read_png(Path(scan_dir) / f"{c}.png", IMAGE_FILES[f"{c}.png"]))
    out = Path(tmp_out)
    photo_bytes = (Path(scan_dir) / "photo.png").read_bytes()
    (out / "photos" / f"{scan.scan_id}.png").write_bytes(photo_bytes)
    for c in conditions:
        (out / "conditions" / c / f"{scan.scan_id}.png").write_bytes(png_bytes(encode_u8(c, scan), "RGB"))
    caption = PHOTO_CAPTION if photo_only else scan.meta["caption"] if clinic else caption_from_meta(scan.meta)
    return scan.scan_id, hashlib.sha256(photo_bytes).hexdigest(), caption, conditions


def _validated_scans(cfg: PrepareConfig):
    """The scan folders of ``cfg.sources`` and the contract outcome; refuses while an ingestion
    batch is unfinished and raises :class:`ContractError` on any violation."""
    journal = pending_journal(cfg.data_root)
    if journal is not None:
        raise ContractError(f"{journal}: an ingestion batch is unfinished; run the ingest step first (it completes it)")
    dirs, counts = _scan_dirs(cfg.sources)
    if not dirs:
        raise ContractError(f"no scans found in {[str(s) for s in cfg.sources]}")
    manifest = build_manifest(dirs, cfg.data_root, cfg.contract)
    outcome = validate(manifest, cfg.contract)
    if not outcome.success:
        lines = [f"{sid}/{v.file}: {v.rule} ({v.detail})" for sid, vs in sorted(outcome.violations.items()) for v in vs]
        more = f"\n... and {len(lines) - 20} more" if len(lines) > 20 else ""
        raise ContractError(f"{len(outcome.violations)} scans break the data contract:\n" + "\n".join(lines[:20]) + more)
    return dirs, counts, outcome


def _write_all_scans(jobs: list, workers: int, progress: bool) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Run :func:`_write_scan_outputs` over ``jobs`` (in ``workers`` processes); sorted results."""
    from tqdm import tqdm

    results: list[tuple[str, str, str, tuple[str, ...]]] = []
    bar = tqdm(total=len(jobs), desc="prepare", unit="scan", disable=not progress)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
            for r in pool.imap(_write_scan_outputs, jobs, chunksize=32):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(_write_scan_outputs(job))
            bar.update()
    bar.close()
    return sorted(results)


def _write_pairs(folder: Path, condition: str, results: list[tuple[str, str, str, tuple[str, ...]]],
                 splits: dict[str, str]) -> None:
    with open(folder / "pairs.jsonl", "w") as f:
        for sid, sha, caption, written in results:
            if condition not in written:  # a photo-only or clinic scan lacks some rendered conditions
                continue
            f.write(json.dumps({
                "scan_id": sid, "split": splits[sid], "photo": f"photos/{sid}.png",
                "photo_sha256": sha, "condition": f"conditions/{condition}/{sid}.png", "caption": caption,
            }, sort_keys=True) + "\n")


def _write_meta(meta: Path, cfg: PrepareConfig, outcome, splits: dict[str, str]) -> dict[str, list[str]]:
    """``manifest.csv`` (with the split column), ``splits.json``, ``validation.json``; returns the
    scan ids by split."""
    manifest = outcome.manifest.copy()
    manifest.insert(1, "split", manifest["scan_id"].map(splits))
    manifest.to_csv(meta / "manifest.csv", index=False)
    by_split = {k: sorted(s for s, v in splits.items() if v == k) for k in ("train", "validation", "test")}
    _dump(meta / "splits.json", {"test_fraction": cfg.test_fraction, "validation_fraction": cfg.validation_fraction,
                                 "rule": SPLIT_RULE, **by_split})
    _dump(meta / "validation.json", summary_report(outcome))
    return by_split


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Validate the scans of ``cfg.sources`` and write ``cfg.out`` (see the module docstring).
    ``PrepareResult.hashes`` holds each condition folder's DVC directory hash."""
    start = time.perf_counter()
    dirs, counts, outcome = _validated_scans(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in ["photos", "meta", *[f"conditions/{c}" for c in cfg.conditions]]:
            (tmp / sub).mkdir(parents=True)
        splits = {d.name: split_of(d.name, cfg.test_fraction, cfg.validation_fraction) for d in dirs}
        jobs = []
        for d in sorted(dirs, key=lambda p: p.name):
            layout = scan_layout(d)
            maps = clinic_map_names(clinic_meta(d) or {}) if layout == CLINIC else ()
            jobs.append((str(d), str(tmp), splits[d.name], conditions_of(layout, tuple(cfg.conditions), maps), layout))
        results = _write_all_scans(jobs, cfg.workers, cfg.progress)
        for c in cfg.conditions:
            _write_pairs(tmp / "conditions" / c, c, results, splits)
        by_split = _write_meta(tmp / "meta", cfg, outcome, splits)
        hashes = {c: dvc_dir_md5(tmp / "conditions" / c) for c in cfg.conditions}
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(out=out, scans=len(dirs), train=len(by_split["train"]),
                         validation=len(by_split["validation"]), test=len(by_split["test"]), hashes=hashes,
                         seconds=round(time.perf_counter() - start, 2), sources=counts)


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
