import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctrlora.data.contract import ContractError
from ctrlora.data.ingest import JOURNAL, IngestConfig, ingest, recover
from ctrlora.data.prepare import PrepareConfig, prepare
from ctrlora.data.render import render_scan
from ctrlora.data.scan import write_scan


def _write(root: Path, seed: int, scan_id: str) -> Path:
    rs = render_scan(seed, scan_id=scan_id)
    return write_scan(rs.scan, root)


def _huge_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.unlink()
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(path, format="PNG")


def _inventory(*roots: Path) -> dict[str, list[str]]:
    """sha256 -> where, for every regular file (symlinks are listed, never followed)."""
    found: dict[str, list[str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not enter linked folders
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = os.path.join(dirpath, name)
                key = "link:" + os.readlink(p) if os.path.islink(p) else hashlib.sha256(Path(p).read_bytes()).hexdigest()
                found.setdefault(key, []).append(p)
    return found


# bad scan id -> the rule its quarantine reason must name (and the file, "." for the scan itself)
EXPECTED = {
    "bad-truncated": ("photo.png", "decodable"),
    "bad-zero": ("segmentation.png", "non_empty_file"),
    "bad-text": ("depth.png", "decodable"),
    "bad-size": ("photo.png", "expected_size"),
    "bad-rgba": ("photo.png", "expected_mode"),
    "bad-16bit": ("depth.png", "expected_mode"),
    "bad-palette": ("photo.png", "expected_mode"),
    "bad-label": ("segmentation.png", "segmentation_labels"),
    "bad-missing": ("normal.png", "required_file_present"),
    "dup-id": (".", "unique_scan_id"),
    "zz-dupcontent": ("photo.png", "unique_content"),
    "bad-symlink": ("lighting.png", "path_inside_root"),
    "bad-huge": ("photo.png", "header_within_limits"),
    "bad-normals": ("normal.png", "normal_unit_length"),
}
GOOD = ["good-a", "good-b", "good-c"]


@pytest.fixture()
def batch(tmp_path):
    data = tmp_path / "data"
    cfg = IngestConfig.under(data)
    for p in (cfg.incoming, cfg.store, cfg.quarantine):
        p.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(b"not yours")

    _write(cfg.store, 100, "dup-id")  # already accepted
    (cfg.quarantine / "bad-truncated").mkdir()  # an earlier quarantine of the same name
    (cfg.quarantine / "bad-truncated" / "note.txt").write_text("earlier")

    inc = cfg.incoming
    for i, sid in enumerate(GOOD):
        _write(inc, 10 + i, sid)
    for i, sid in enumerate(EXPECTED):
        if sid != "zz-dupcontent":
            _write(inc, 20 + i, sid)
    d = inc / "bad-truncated" / "photo.png"
    d.write_bytes(d.read_bytes()[: len(d.read_bytes()) // 2])
    (inc / "bad-zero" / "segmentation.png").write_bytes(b"")
    (inc / "bad-text" / "depth.png").write_text("this is not a PNG\n")
    _save(inc / "bad-size" / "photo.png", np.zeros((32, 32, 3), np.uint8))
    photo = np.asarray(Image.open(inc / "bad-rgba" / "photo.png"))
    _save(inc / "bad-rgba" / "photo.png", photo, "RGBA")
    depth = np.asarray(Image.open(inc / "bad-16bit" / "depth.png")).astype(np.uint16) * 257
    _save(inc / "bad-16bit" / "depth.png", depth)
    _save(inc / "bad-palette" / "photo.png", np.asarray(Image.open(inc / "bad-palette" / "photo.png")), "P")
    seg = np.asarray(Image.open(inc / "bad-label" / "segmentation.png")).copy()
    seg[0, 0] = 77
    _save(inc / "bad-label" / "segmentation.png", seg)
    (inc / "bad-missing" / "normal.png").unlink()
    # same photo as good-a, under another id (sorts after it: good-a keeps it)
    src = inc / "good-a"
    (inc / "zz-dupcontent").mkdir()
    for f in sorted(src.iterdir(), key=lambda p: p.name == "READY"):
        (inc / "zz-dupcontent" / f.name).write_bytes(f.read_bytes())
    (inc / "bad-symlink" / "lighting.png").unlink()
    os.symlink(secret, inc / "bad-symlink" / "lighting.png")
    (inc / "bad-huge" / "photo.png").write_bytes(_huge_png(100_000, 100_000))
    nrm = np.asarray(Image.open(inc / "bad-normals" / "normal.png")).copy()
    nrm[10:20, 10:20] = (128, 128, 128)  # length ~0
    _save(inc / "bad-normals" / "normal.png", nrm)
    # landing in progress: no READY yet
    _write(inc, 99, "not-ready")
    (inc / "not-ready" / "READY").unlink()
    return cfg, tmp_path, secret


def test_batch_with_every_kind_of_bad_scan(batch):
    cfg, tmp_path, secret = batch
    before = _inventory(cfg.data_root)
    report = ingest(cfg)

    assert sorted(report.accepted) == GOOD
    assert report.pending == ["not-ready"]
    assert set(report.quarantined) == set(EXPECTED)
    for sid, (file, rule) in EXPECTED.items():
        qdir = cfg.quarantine / report.quarantined[sid]
        reason = json.loads((qdir / "reason.json").read_text())
        assert reason["scan_id"] == sid
        got = {(v["file"], v["rule"]) for v in reason["violations"]}
        assert (file, rule) in got, (sid, got)
        assert all(v["detail"] for v in reason["violations"])
    # the symlink broke only its own rule; the dup id only the id rule
    assert {v["rule"] for v in report.violations["bad-symlink"]} == {"path_inside_root"}
    assert {v["rule"] for v in report.violations["dup-id"]} == {"unique_scan_id"}
    # a taken quarantine name is suffixed, never overwritten
    assert report.quarantined["bad-truncated"] == "bad-truncated.1"
    assert (cfg.quarantine / "bad-truncated" / "note.txt").read_text() == "earlier"
    # accepted scans are whole in the store; incoming keeps only the incomplete one
    for sid in GOOD:
        assert sorted(p.name for p in (cfg.store / sid).iterdir()) == sorted(
            ["photo.png", "segmentation.png", "lighting.png", "normal.png", "depth.png", "meta.json", "READY"])
    assert os.listdir(cfg.incoming) == ["not-ready"]
    assert not (cfg.data_root / JOURNAL).exists()
    # nothing lost: every input file (and link) is still somewhere under the data folder
    after = _inventory(cfg.data_root)
    for key, where in before.items():
        assert len(after.get(key, [])) >= len(where), (key, where)
    assert os.path.islink(cfg.quarantine / "bad-symlink" / "lighting.png")
    assert secret.read_bytes() == b"not yours"
    assert report.validation["success"] is False

    # a second run changes nothing; once READY lands, the pending scan goes in
    again = ingest(cfg)
    assert again.accepted == [] and again.quarantined == {} and again.pending == ["not-ready"]
    (cfg.incoming / "not-ready" / "READY").write_bytes(b"")
    assert ingest(cfg).accepted == ["not-ready"]


def test_symlinked_scan_folder_is_quarantined_without_entering_it(tmp_path):
    cfg = IngestConfig.under(tmp_path / "data")
    cfg.incoming.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write(elsewhere, 1, "linked")
    os.symlink(elsewhere / "linked", cfg.incoming / "linked")
    report = ingest(cfg)
    assert report.quarantined == {"linked": "linked"}
    q = cfg.quarantine / "linked"
    assert os.path.islink(q / "scan_link") and json.loads((q / "reason.json").read_text())["violations"]
    assert {v["rule"] for v in report.violations["linked"]} == {"path_inside_root"}
    assert len(os.listdir(elsewhere / "linked")) == 7  # the target is untouched


def test_interrupted_batch_rolls_forward_and_blocks_prepare(tmp_path):
    cfg = IngestConfig.under(tmp_path / "data")
    for p in (cfg.incoming, cfg.store, cfg.quarantine):
        p.mkdir(parents=True)
    _write(cfg.incoming, 1, "s1")
    _write(cfg.incoming, 2, "s2")
    # state after a crash: journal written, first move done, second not
    plan = [{"src": "incoming/s1", "dst": "scans/s1", "reason": None},
            {"src": "incoming/s2", "dst": "quarantine/s2", "reason": {"scan_id": "s2", "batch": "b1", "violations": []}}]
    (cfg.data_root / JOURNAL).write_text(json.dumps({"batch": "b1", "moves": plan}))
    os.rename(cfg.incoming / "s1", cfg.store / "s1")
    with pytest.raises(ContractError, match="unfinished"):
        prepare(PrepareConfig(sources=(cfg.store,), out=cfg.data_root / "prepared", data_root=cfg.data_root,
                              workers=1, progress=False))
    assert recover(cfg) == 1
    assert (cfg.store / "s1" / "READY").exists() and (cfg.quarantine / "s2" / "reason.json").exists()
    assert not (cfg.data_root / JOURNAL).exists() and os.listdir(cfg.incoming) == []
