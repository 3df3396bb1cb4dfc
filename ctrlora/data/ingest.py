"""Ingestion of landed scans into the accepted store, with quarantine.

Landing protocol
----------------
A producer writes a scan into ``<data>/incoming/<scan_id>/`` and creates the empty file ``READY``
*last* (after every other file is closed). Ingestion considers a folder only once ``READY`` exists;
folders without it (still being written), hidden entries (``.name``, e.g. a producer's temporary
folder) and stray plain files are left alone and reported as pending / ignored.

Ingestion of one batch
----------------------
1. Complete scans are inspected and validated against the contract
   (:mod:`ctrlora.data.contract`, great-expectations on the manifest table).
2. A *journal* (``<data>/.ingest-journal.json``, written atomically) lists every planned move:
   valid scans ``incoming/<id> -> scans/<id>``, failed ones ``incoming/<id> ->
   quarantine/<name>`` with their reasons. Then the moves run (``os.rename``, atomic, same
   filesystem), ``reason.json`` is written into each quarantined folder, and the journal is
   removed. A crash midway leaves the journal; the next ingestion first completes it (roll
   forward), and readers of the store (``prepare``) refuse to run while a journal exists, so they
   see the old store or the new one, never a half-applied batch. Moves never overwrite and
   nothing is ever deleted.
3. A *landed photograph* (a folder without rendered maps: READY plus one JPEG or PNG, see
   :mod:`ctrlora.data.photos`) that passes is normalised before anything is stored: its
   ``photo.png`` (pixels only, no metadata), ``meta.json`` (``"kind": "photo"``) and READY are
   written to a hidden folder in the store, which the journal then renames to ``scans/<id>``;
   the landed original, whose metadata must not be kept, is deleted after that rename (its
   sha256 stays in meta.json). A refused photograph is quarantined untouched like any scan.
   Duplicates are found by the hash of the normalised pixels, across batches.
4. A quarantine name that is taken gets a numeric suffix (``<id>.1``, ``<id>.2``, ...).
   A quarantined scan folder that is itself a symlink is not entered: a fresh folder
   ``quarantine/<name>/`` receives ``reason.json`` and the link itself as ``scan_link``.
5. A *clinic scan* (written by :mod:`ctrlora.data.clinic`: photo, any subset of segmentation /
   depth / normal, a ``"kind": "clinic"`` meta.json) is already normalised when it lands; it is
   validated and moved byte for byte like a rendered scan, its duplicates found by the hash of its
   photograph's pixels like a photo-only scan. A photograph the importer itself refuses never
   lands: :func:`quarantine_files` writes its original files and the same ``reason.json``
   straight into quarantine.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrlora.data.contract import (CLINIC, PHOTO, ContractConfig, ContractError, Violation, build_manifest, scan_layout,
                                   summary_report, validate)
from ctrlora.data.files import png_bytes, read_png, sha256_file
from ctrlora.data.photos import NormalisedPhoto, is_photo_name, photo_scan_meta, pixel_sha256
from ctrlora.data.scan import META, READY, meta_bytes

JOURNAL = ".ingest-journal.json"
PHOTO_TMP_PREFIX = ".tmp-photo-"  # hidden folders in the store holding a normalised photo until its move


@dataclass(frozen=True)
class IngestConfig:
    data_root: Path  # every path must stay inside this folder
    incoming: Path
    store: Path  # accepted scans
    quarantine: Path
    contract: ContractConfig = ContractConfig()

    @classmethod
    def under(cls, data_root: Path | str, contract: ContractConfig = ContractConfig()) -> "IngestConfig":
        root = Path(data_root)
        return cls(root, root / "incoming", root / "scans", root / "quarantine", contract)


@dataclass
class IngestReport:
    accepted: list[str] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)  # scan id -> quarantine folder name
    violations: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # no READY yet: left in incoming
    ignored: list[str] = field(default_factory=list)  # hidden entries, stray files: left alone
    photos: list[str] = field(default_factory=list)  # accepted landed photographs (normalised)
    recovered_moves: int = 0
    validation: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"accepted {len(self.accepted)} ({len(self.photos)} photographs normalised), "
                 f"quarantined {len(self.quarantined)}, "
                 f"pending {len(self.pending)}, ignored {len(self.ignored)}"
                 + (f", recovered {self.recovered_moves} moves of an interrupted batch" if self.recovered_moves else "")]
        for sid, qname in sorted(self.quarantined.items()):
            rules = sorted({v["rule"] for v in self.violations.get(sid, [])})
            lines.append(f"  quarantined {sid} -> quarantine/{qname}: {', '.join(rules)}")
        return "\n".join(lines)


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _check_layout(cfg: IngestConfig) -> None:
    root = os.path.realpath(cfg.data_root)
    for p in (cfg.incoming, cfg.store, cfg.quarantine):
        p.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(p)
        if not (real == root or real.startswith(root + os.sep)):
            raise ContractError(f"{p}: resolves outside the data folder {root}")
    devices = {os.stat(p).st_dev for p in (cfg.incoming, cfg.store, cfg.quarantine)}
    if len(devices) != 1:
        raise ContractError("incoming, store and quarantine must be on one filesystem (atomic rename)")


def pending_journal(data_root: Path) -> Path | None:
    p = Path(data_root) / JOURNAL
    return p if p.exists() else None


def _reason_path(folder: Path) -> Path:
    p = folder / "reason.json"
    n = 1
    while os.path.lexists(p):  # the scan carried its own reason.json: never overwrite it
        p = folder / f"reason.{n}.json"
        n += 1
    return p


def _reason_written(folder: Path, batch: str) -> bool:
    for p in folder.glob("reason*.json"):
        if p.is_file() and not p.is_symlink():
            try:
                if json.loads(p.read_text()).get("batch") == batch:
                    return True
            except (ValueError, AttributeError):
                continue
    return False


def _apply(plan: list[dict[str, Any]], root: Path) -> int:
    """Carry out (or finish) the planned moves; idempotent. Returns the number of moves done."""
    done = 0
    for step in plan:
        src, dst = root / step["src"], root / step["dst"]
        if step.get("wrap"):  # symlinked scan folder: real folder + the link inside it
            target = dst / "scan_link"
            dst.mkdir(exist_ok=True)
        else:
            target = dst
        if os.path.lexists(src):
            if os.path.lexists(target):
                raise ContractError(f"cannot move {src} to {target}: destination exists (refusing to overwrite)")
            os.rename(src, target)
            done += 1
        elif not os.path.lexists(target):
            raise ContractError(f"journal step lost: neither {src} nor {target} exists")
        if step.get("discard") is not None and os.path.lexists(root / step["discard"]):
            # the landed original of a normalised photograph, now stored without its metadata
            shutil.rmtree(root / step["discard"])
        if step.get("reason") is not None and not _reason_written(dst, step["reason"]["batch"]):
            _write_json_atomic(_reason_path(dst), step["reason"])
    return done


def recover(cfg: IngestConfig) -> int:
    """Finish an interrupted batch (roll forward) if its journal is present."""
    journal = pending_journal(cfg.data_root)
    if journal is None:
        return 0
    plan = json.loads(journal.read_text())["moves"]
    done = _apply(plan, Path(cfg.data_root))
    os.unlink(journal)
    return done


def _store_index(store: Path) -> tuple[set[str], dict[str, str]]:
    """Accepted scan ids and photo content keys (as :func:`ctrlora.data.contract.content_key`)."""
    ids: set[str] = set()
    hashes: dict[str, str] = {}
    for name in sorted(os.listdir(store)):
        if name.startswith("."):
            continue
        ids.add(name)
        photo = store / name / "photo.png"
        if photo.is_file() and not photo.is_symlink():
            if scan_layout(store / name) in (PHOTO, CLINIC):
                hashes.setdefault("px:" + pixel_sha256(read_png(photo, "RGB")), name)
            else:
                hashes.setdefault(sha256_file(photo), name)
    return ids, hashes


def _clear_photo_temps(store: Path) -> None:
    """Remove normalised-photo folders of a batch that stopped before its journal was written
    (with no journal left, nothing refers to them; the landed originals are still in incoming)."""
    for name in os.listdir(store):
        if name.startswith(PHOTO_TMP_PREFIX) and os.path.isdir(store / name) and not os.path.islink(store / name):
            shutil.rmtree(store / name)


def _stage_photo(cfg: IngestConfig, scan_dir: Path, photo: NormalisedPhoto) -> Path:
    """Write the normalised scan into a hidden folder of the store; returns it."""
    original = next(n for n in sorted(os.listdir(scan_dir)) if is_photo_name(n))
    tmp = Path(tempfile.mkdtemp(prefix=f"{PHOTO_TMP_PREFIX}{scan_dir.name}-", dir=cfg.store))
    meta = photo_scan_meta(scan_dir.name, cfg.contract.resolution, photo, sha256_file(scan_dir / original))
    (tmp / "photo.png").write_bytes(png_bytes(photo.pixels, "RGB"))
    (tmp / META).write_bytes(meta_bytes(meta))
    (tmp / READY).write_bytes(b"")
    os.chmod(tmp, 0o755)
    return tmp


def _quarantine_name(quarantine: Path, scan_id: str, taken: set[str]) -> str:
    name, n = scan_id, 0
    while name in taken or os.path.lexists(quarantine / name):
        n += 1
        name = f"{scan_id}.{n}"
    taken.add(name)
    return name


def batch_id() -> str:
    """The ``batch`` of a reason.json: UTC time and process id."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def quarantine_files(quarantine: Path, scan_id: str, files: dict[str, bytes], violations: list[Violation],
                     batch: str, **extra: Any) -> str:
    """Quarantine a refused scan that never landed (a photograph of a clinic's export that the
    importer refuses): ``quarantine/<name>/`` receives ``files`` (relative path -> bytes, e.g. the
    original photograph and maps, byte for byte) and a ``reason.json`` of the same form ingestion
    writes (``extra`` keys added). Built in a hidden folder and renamed into place, so a reader sees
    all of it or nothing; a taken name gets a suffix as in :func:`ingest`. Returns the name."""
    quarantine = Path(quarantine)
    quarantine.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-quarantine-{scan_id}-", dir=quarantine))
    try:
        for rel, data in files.items():
            target = tmp / rel
            if os.path.isabs(rel) or ".." in Path(rel).parts or target.name == "reason.json":
                raise ValueError(f"{rel}: not a plain relative file name for a quarantine folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        name = _quarantine_name(quarantine, scan_id, set())
        _write_json_atomic(tmp / "reason.json", {"scan_id": scan_id, "quarantined_as": name, "batch": batch,
                                                 "violations": [v.as_dict() for v in violations], **extra})
        os.chmod(tmp, 0o755)
        os.rename(tmp, quarantine / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return name


def find_complete(incoming: Path) -> tuple[list[Path], list[str], list[str]]:
    """(complete scan folders, pending ids, ignored entries) of the landing folder."""
    complete, pending, ignored = [], [], []
    for name in sorted(os.listdir(incoming)):
        path = incoming / name
        if name.startswith("."):
            ignored.append(name)
        elif os.path.islink(path):
            complete.append(path)  # not entered; it will be quarantined (link only)
        elif not path.is_dir():
            ignored.append(name)
        elif os.path.lexists(path / READY):
            complete.append(path)
        else:
            pending.append(name)
    return complete, pending, ignored


def ingest(cfg: IngestConfig) -> IngestReport:
    """Validate every complete scan in ``incoming`` and move it to the store or quarantine."""
    _check_layout(cfg)
    report = IngestReport()
    report.recovered_moves = recover(cfg)
    _clear_photo_temps(cfg.store)
    candidates, report.pending, report.ignored = find_complete(cfg.incoming)
    if not candidates:
        return report
    known_ids, known_hashes = _store_index(cfg.store)
    normalised: dict[str, NormalisedPhoto] = {}
    manifest = build_manifest(candidates, cfg.data_root, cfg.contract, known_ids, known_hashes,
                              landed_photos=True, normalised=normalised)
    outcome = validate(manifest, cfg.contract)
    report.validation = summary_report(outcome)

    batch = batch_id()
    root = Path(cfg.data_root)
    taken: set[str] = set()
    plan: list[dict[str, Any]] = []
    for path in candidates:
        sid = path.name
        rel_src = os.path.relpath(path, root)
        if sid in outcome.violations:
            qname = _quarantine_name(cfg.quarantine, sid, taken)
            viol: list[Violation] = outcome.violations[sid]
            reason = {
                "scan_id": sid,
                "quarantined_as": qname,
                "batch": batch,
                "violations": [v.as_dict() for v in viol],
            }
            plan.append({"src": rel_src, "dst": os.path.relpath(cfg.quarantine / qname, root),
                         "wrap": os.path.islink(path), "reason": reason})
            report.quarantined[sid] = qname
            report.violations[sid] = reason["violations"]
        elif sid in normalised:
            try:
                staged = _stage_photo(cfg, path, normalised[sid])
            except BaseException:
                _clear_photo_temps(cfg.store)
                raise
            plan.append({"src": os.path.relpath(staged, root), "dst": os.path.relpath(cfg.store / sid, root),
                         "reason": None, "discard": rel_src})
            report.accepted.append(sid)
            report.photos.append(sid)
        else:
            plan.append({"src": rel_src, "dst": os.path.relpath(cfg.store / sid, root), "reason": None})
            report.accepted.append(sid)
    journal = root / JOURNAL
    _write_json_atomic(journal, {"batch": batch, "moves": plan})
    _apply(plan, root)
    os.unlink(journal)
    return report
