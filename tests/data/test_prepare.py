import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ctrlora.data.captions import caption_from_meta
from ctrlora.data.conditions import CONDITIONS
from ctrlora.data.contract import ContractError
from ctrlora.data.files import read_png, sha256_file
from ctrlora.data.hashing import dvc_dir_md5
from ctrlora.data.pairs import PairDataset
from ctrlora.data.prepare import PrepareConfig, prepare, split_of
from ctrlora.data.render import DatasetConfig, render_dataset, scan_id_for
from ctrlora.data.scan import load_scan, write_scan
from ctrlora.data.render import render_scan

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data = tmp_path_factory.mktemp("prep") / "data"
    render_dataset(DatasetConfig(out=data / "rendered", n=16, seed=3, workers=1, progress=False))
    (data / "scans").mkdir()
    write_scan(render_scan(500, scan_id="accepted-1").scan, data / "scans")
    (data / "scans" / ".gitkeep").write_bytes(b"")
    cfg = PrepareConfig(sources=(data / "rendered", data / "scans", data / "absent"), out=data / "prepared",
                        data_root=data, test_fraction=0.3, workers=2, progress=False)
    result = prepare(cfg)
    return cfg, result


def test_layout_and_pairs(prepared):
    cfg, result = prepared
    out = cfg.out
    assert result.scans == 17 and result.train + result.validation + result.test == 17 and result.test > 0
    assert sorted(p.name for p in out.iterdir()) == ["conditions", "meta", "photos"]
    assert sorted(p.name for p in (out / "conditions").iterdir()) == sorted(CONDITIONS)
    assert sorted(p.name for p in (out / "meta").iterdir()) == ["manifest.csv", "splits.json", "validation.json"]
    ids = sorted(p.stem for p in (out / "photos").iterdir())
    assert len(ids) == 17 and "accepted-1" in ids
    splits = json.loads((out / "meta" / "splits.json").read_text())
    for c in CONDITIONS:
        rows = [json.loads(x) for x in (out / "conditions" / c / "pairs.jsonl").read_text().splitlines()]
        assert [r["scan_id"] for r in rows] == ids
        for r in rows:
            assert set(r) == {"scan_id", "split", "photo", "photo_sha256", "condition", "caption"}
            assert r["photo"] == f"photos/{r['scan_id']}.png" and r["condition"] == f"conditions/{c}/{r['scan_id']}.png"
            assert sha256_file(out / r["photo"]) == r["photo_sha256"]
            assert r["scan_id"] in splits[r["split"]]
            assert read_png(out / r["condition"], "RGB").shape == (64, 64, 3)
    # photos are the scans' own bytes; captions come from the metadata
    rid = scan_id_for(3, 0)
    src = cfg.data_root / "rendered" / rid
    assert (out / "photos" / f"{rid}.png").read_bytes() == (src / "photo.png").read_bytes()
    row = json.loads((out / "conditions" / "depth" / "pairs.jsonl").read_text().splitlines()[ids.index(rid)])
    assert row["caption"] == caption_from_meta(load_scan(src).meta)
    manifest = pd.read_csv(out / "meta" / "manifest.csv")
    assert len(manifest) == 17 * 7 and set(manifest["split"]) == {"train", "validation", "test"}
    validation = json.loads((out / "meta" / "validation.json").read_text())
    assert validation["success"] is True and validation["scans"] == 17 and validation["violations"] == {}
    assert result.hashes == {c: dvc_dir_md5(out / "conditions" / c) for c in CONDITIONS}


def test_pair_dataset(prepared):
    cfg, result = prepared
    train = PairDataset(cfg.out, "segmentation", "train")
    test = PairDataset(cfg.out, "segmentation", "test", preload=True)
    assert len(train) == result.train and len(test) == result.test
    item = test[0]
    assert item["photo"].shape == (3, 64, 64) and item["condition"].shape == (3, 64, 64)
    assert item["photo"].dtype == item["condition"].dtype
    assert -1.0 <= float(item["photo"].min()) and float(item["photo"].max()) <= 1.0
    assert 0.0 <= float(item["condition"].min()) and float(item["condition"].max()) <= 1.0
    assert isinstance(item["caption"], str) and item["scan_id"] in json.loads((cfg.out / "meta" / "splits.json").read_text())["test"]
    with pytest.raises(FileNotFoundError):
        PairDataset(cfg.out, "sketch", "train")


def test_prepare_is_deterministic(prepared, tmp_path):
    cfg, result = prepared
    again = prepare(PrepareConfig(sources=cfg.sources, out=tmp_path / "again", data_root=cfg.data_root,
                                  test_fraction=0.3, workers=1, progress=False))
    assert again.hashes == result.hashes


def test_split_is_deterministic_and_default_set_is_big_enough():
    ids = [f"scan-{i}" for i in range(4000)]
    first = [split_of(s, 0.1) for s in ids]
    assert first == [split_of(s, 0.1) for s in ids]
    assert 0.08 < first.count("test") / len(ids) < 0.12
    # the default parameters give >= 2000 train and >= 200 test scans
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    default = [split_of(scan_id_for(params["render"]["seed"], i), params["prepare"]["test_fraction"])
               for i in range(params["render"]["n"])]
    assert default.count("train") >= 2000 and default.count("test") >= 200


def test_prepare_refuses_a_broken_scan(tmp_path):
    data = tmp_path / "data"
    (data / "scans").mkdir(parents=True)
    write_scan(render_scan(1, scan_id="ok").scan, data / "scans")
    write_scan(render_scan(2, scan_id="broken").scan, data / "scans")
    (data / "scans" / "broken" / "depth.png").write_bytes(b"")
    with pytest.raises(ContractError, match=r"broken/depth.png: non_empty_file"):
        prepare(PrepareConfig(sources=(data / "scans",), out=data / "prepared", data_root=data, workers=1, progress=False))
    assert not (data / "prepared").exists()


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")


def test_hash_is_order_independent_and_content_sensitive(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"s{i}.png": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for i in range(5)}
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for name in sorted(images):
        _png(a / name, images[name])
    for name in sorted(images, reverse=True):
        _png(b / name, images[name])
    assert dvc_dir_md5(a) == dvc_dir_md5(b)
    changed = images["s3.png"].copy()
    changed[4, 4, 1] ^= 1
    (b / "s3.png").unlink()
    _png(b / "s3.png", changed)
    assert dvc_dir_md5(a) != dvc_dir_md5(b)
    # renaming a file changes the hash too
    shutil.copytree(a, tmp_path / "c")
    (tmp_path / "c" / "s0.png").rename(tmp_path / "c" / "t0.png")
    assert dvc_dir_md5(tmp_path / "c") != dvc_dir_md5(a)


def test_hash_equals_what_dvc_records(prepared, tmp_path):
    """`dvc add` in a real temporary git + DVC repository records the same md5 for a prepared
    condition folder (and a nested folder) as our function computes."""
    cfg, result = prepared
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    shutil.copytree(cfg.out / "conditions" / "normal", repo / "normal")
    nested = repo / "nested"
    (nested / "deep" / "er").mkdir(parents=True)
    (nested / "deep" / "er" / "x.txt").write_text("line\r\nwindows line end\r\n")
    (nested / "a.bin").write_bytes(bytes(range(256)))
    subprocess.run([DVC, "add", "-q", "normal", "nested"], cwd=repo, check=True)
    recorded = {name: yaml.safe_load((repo / f"{name}.dvc").read_text())["outs"][0] for name in ("normal", "nested")}
    assert recorded["normal"]["md5"] == result.hashes["normal"] == dvc_dir_md5(repo / "normal")
    assert recorded["nested"]["md5"] == dvc_dir_md5(nested)
    assert recorded["normal"].get("hash") == "md5"  # DVC 3 hashing (no dos2unix)
