"""The frozen benchmark and the paired promotion gate, on a toy project built here: real rendered
scans prepared by the real ``prepare`` (32 px), a real re-detector, a tiny real backbone / base /
adapters, a real sqlite MLflow store. Champion and challenger are generated and scored in one
run; the alias moves on the paired interval only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mlflow")

from _models_helpers import save_tiny_models  # noqa: E402

SIZE = 32
REPO = Path(__file__).resolve().parents[2]


def _params(root: Path, base=(), adapters=("lighting",), max_scans: int = 6, **register) -> None:
    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    params = {"paths": paths, "train_base": {"conditions": list(base)},
              "train_adapter": {"conditions": list(adapters)},
              "register": {"gate": {"rule": "superiority", "min_delta": 0.0},
                           "benchmark": {"max_scans": max_scans, "grid_rows": 3,
                                         "sampling": {"steps": 2, "scheduler": "dpm_karras", "guidance_scale": 1.0,
                                                      "batch_size": 8, "seed": 5},
                                         "bootstrap": {"n_boot": 300, "seed": 0}},
                           **register}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


TEST_FRACTION, VALIDATION_FRACTION = 0.4, 0.3


def _prepare(data: Path, sources, conditions=("lighting",)) -> None:
    from ctrlora.data.contract import ContractConfig
    from ctrlora.data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(sources=tuple(sources), out=data / "prepared", data_root=data,
                          test_fraction=TEST_FRACTION, validation_fraction=VALIDATION_FRACTION,
                          conditions=tuple(conditions),
                          contract=ContractConfig(resolution=SIZE), workers=1, progress=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """data/rendered, data/prepared, foundation/detectors/lighting, models/{backbone, base}
    and three lighting adapters (``models/adapters/lighting-<k>``) on one base."""
    from ctrlora.data.render import DatasetConfig, render_dataset
    from ctrlora.evaluation.detectors import save_detector, train_detector
    from ctrlora.evaluation.fidelity import default_detector_config
    from ctrlora.evaluation.loading import detector_targets, load_split

    root = tmp_path_factory.mktemp("gate") / "project"
    data = root / "data"
    render_dataset(DatasetConfig(out=data / "rendered", n=20, seed=3, resolution=SIZE, workers=1,
                                 progress=False))
    _prepare(data, [data / "rendered"])
    train = load_split(data / "prepared", "train", ["lighting"], progress=False)
    det = train_detector(default_detector_config("lighting", width=4, epochs=1), train.photos,
                         detector_targets("lighting", train), progress=False)
    save_detector(det, root / "foundation/detectors/lighting")
    save_tiny_models(root, SIZE, [("lighting", k, k) for k in (1, 2, 3)])
    _params(root)
    return root


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-gate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-gate")
        mp.setenv("CTRLORA_PARTS_CACHE", str(root / "parts-cache"))
        yield


def test_paired_decision_rules():
    from pipelines.registry.gate import paired_decision

    sup = {"rule": "superiority", "min_delta": 0.0}
    ok, why = paired_decision(sup, 0.05, 0.02, 0.08, champion_version="3", same_data=True)
    assert ok and "champion v3" in why and "+0.02" in why
    # noise: the interval straddles zero, however good the mean looks
    assert not paired_decision(sup, 0.03, -0.001, 0.06, champion_version="3", same_data=False)[0]
    assert not paired_decision({**sup, "min_delta": 0.05}, 0.05, 0.02, 0.08, champion_version="3",
                               same_data=True)[0]
    tie = paired_decision(sup, 0.0, 0.0, 0.0, champion_version="3", same_data=False, all_zero=True)
    assert not tie[0] and "tie" in tie[1]
    non = {"rule": "noninferiority", "margin": 0.02}
    assert paired_decision(non, 0.004, -0.01, 0.02, champion_version="1", same_data=False)[0]
    assert not paired_decision(non, 0.004, -0.03, 0.02, champion_version="1", same_data=False)[0]
    assert not paired_decision(non, -0.001, -0.01, 0.01, champion_version="1", same_data=False)[0]
    # retrained on the champion's own data: non-inferiority does not apply
    same = paired_decision(non, 0.004, -0.01, 0.02, champion_version="1", same_data=True)
    assert not same[0] and "same data" in same[1]
    assert not paired_decision(non, 0.0, 0.0, 0.0, champion_version="1", same_data=False, all_zero=True)[0]
    assert not paired_decision(sup, float("nan"), float("nan"), float("nan"), champion_version="1",
                               same_data=False)[0]
    with pytest.raises(ValueError, match="rule"):
        paired_decision({"rule": "vibes"}, 0.1, 0.1, 0.1, champion_version="1", same_data=False)
    with pytest.raises(ValueError, match="margin"):
        paired_decision({"margin": -1}, 0.1, 0.1, 0.1, champion_version="1", same_data=False)


def test_benchmark_is_frozen_versioned_and_never_takes_new_scans(project, tmp_path):
    from ctrlora.data.render import DatasetConfig, render_dataset
    from pipelines.registry import frozen_benchmark as B

    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    with pytest.raises(B.BenchmarkError, match="no benchmark frozen yet"):
        B.open_benchmark(root)
    with pytest.raises(B.BenchmarkError, match="nothing to bump"):
        B.freeze(root, bump=True, reason="x", log=lambda m: None)
    m1 = B.freeze(root, log=lambda m: None)
    splits = json.loads((root / "data/prepared/meta/splits.json").read_text())
    # promotion is model selection: the benchmark is carved from validation, never from test
    assert m1["version"] == 1 and m1["split"] == "validation" and len(m1["scan_ids"]) == 6
    assert set(m1["scan_ids"]) <= set(splits["validation"]) and not set(m1["scan_ids"]) & set(splits["test"])
    assert m1["sampling"]["seed"] == 5 and m1["bootstrap"]["n_boot"] == 300
    assert "detectors/lighting/detector.safetensors" in m1["files"]
    assert (root / "frozen_benchmark/v1.json").is_file()
    with pytest.raises(B.BenchmarkError, match="already frozen"):
        B.freeze(root, log=lambda m: None)

    # scans land and prepare reruns: the benchmark's scans and files stay what they were
    render_dataset(DatasetConfig(out=root / "data/scans", n=10, seed=9, resolution=SIZE, workers=1,
                                 progress=False))
    _prepare(root / "data", [root / "data/rendered", root / "data/scans"])
    new_validation = json.loads((root / "data/prepared/meta/splits.json").read_text())["validation"]
    assert any(s.startswith("r9-") for s in new_validation)
    bench = B.open_benchmark(root)
    assert bench.version == 1 and bench.scan_ids == m1["scan_ids"]
    assert bench.data("lighting").scan_ids == m1["scan_ids"]
    assert set(bench.detectors("lighting")) == {"lighting"}

    # a fresh clone: the store is refilled from the workspace, file by file, checked by hash
    shutil.rmtree(root / "data/frozen_benchmark")
    assert B.open_benchmark(root).scan_ids == m1["scan_ids"]
    # ... but not from a changed origin
    shutil.rmtree(root / "data/frozen_benchmark")
    photo = root / m1["origin"][next(k for k in m1["files"] if k.startswith("prepared/photos/"))]
    photo.write_bytes(photo.read_bytes() + b"\0")
    with pytest.raises(B.BenchmarkError, match=r"photos/.*other content.*never changes"):
        B.open_benchmark(root)
    photo.write_bytes(photo.read_bytes()[:-1])
    # a tampered frozen file is refused, naming it
    store_det = B.materialize(root) / "detectors/lighting/detector_config.json"
    store_det.write_text(store_det.read_text() + " ")
    with pytest.raises(B.BenchmarkError, match="detector_config.json: content differs"):
        B.open_benchmark(root)
    store_det.write_text(store_det.read_text()[:-1])
    # a benchmark scan that the workspace now trains on is refused
    meta = root / "data/prepared/meta/splits.json"
    raw = json.loads(meta.read_text())
    moved = m1["scan_ids"][0]
    raw["validation"].remove(moved)
    raw["train"].append(moved)
    meta.write_text(json.dumps(raw))
    with pytest.raises(B.BenchmarkError, match=f"{moved}.*never trained on"):
        B.open_benchmark(root)

    # only an explicit bump with a reason makes a new version; v1 stays as it was
    _prepare(root / "data", [root / "data/rendered", root / "data/scans"])
    with pytest.raises(B.BenchmarkError, match="reason"):
        B.freeze(root, bump=True, log=lambda m: None)
    v1_text = (root / "frozen_benchmark/v1.json").read_text()
    m2 = B.freeze(root, bump=True, reason="clinic scans landed", log=lambda m: None)
    assert m2["version"] == 2 and m2["previous"] == 1 and m2["reason"] == "clinic scans landed"
    assert (root / "frozen_benchmark/v1.json").read_text() == v1_text
    assert B.open_benchmark(root).version == 2 and B.open_benchmark(root, 1).scan_ids == m1["scan_ids"]


# a deployment with clinic scans: no lighting map ever, maybe only a mask or only a photograph
MIXED = ("segmentation", "depth", "canny", "lighting")
OLD_LAYOUT = ("version", "created", "reason", "previous", "split", "scan_ids", "conditions", "sampling",
              "bootstrap", "grid_rows", "scan_ids_sha256", "pairs", "files", "origin")


def _clinic_ids(n: int, split: str) -> list[str]:
    from ctrlora.data.prepare import split_of

    ids = (f"clinic-{k:03d}" for k in range(1000))
    return [s for s in ids if split_of(s, TEST_FRACTION, VALIDATION_FRACTION) == split][:n]


def _clinic_scan(scans: Path, sid: str, seed: int, maps: tuple[str, ...]) -> None:
    """A landed clinic scan: the photograph of a rendered scene and the maps named (its mask, its
    depth map), never a lighting map."""
    from ctrlora.data.files import png_bytes
    from ctrlora.data.render import RenderConfig, render_scan
    from ctrlora.data.scan import meta_bytes

    scene = render_scan(seed, RenderConfig(resolution=SIZE)).scan
    folder = scans / sid
    folder.mkdir(parents=True)
    (folder / "photo.png").write_bytes(png_bytes(scene.photo, "RGB"))
    for name in maps:
        (folder / f"{name}.png").write_bytes(png_bytes(getattr(scene, name), "L"))
    meta = {"scan_id": sid, "kind": "clinic", "resolution": SIZE, "caption": "dental photo", "maps": list(maps)}
    (folder / "meta.json").write_bytes(meta_bytes(meta))
    (folder / "READY").write_bytes(b"")


def _mixed(root: Path, project: Path, *, rendered: bool) -> dict[str, list[str]]:
    """A copy of ``project`` (with its rendered scans, or without: clinic scans alone) plus clinic
    scans in ``data/scans`` -- in validation one with a mask, one with a mask and a depth map, one
    with only its photograph; in train one with a mask -- prepared for :data:`MIXED`. Returns the
    clinic scan ids by split (validation in that order)."""
    shutil.copytree(project, root, symlinks=True)
    if not rendered:
        shutil.rmtree(root / "data/rendered")
    val, train = _clinic_ids(3, "validation"), _clinic_ids(1, "train")
    maps = [("segmentation",), ("segmentation", "depth"), (), ("segmentation",)]
    for k, (sid, m) in enumerate(zip([*val, *train], maps)):
        _clinic_scan(root / "data/scans", sid, 40 + k, m)
    _prepare(root / "data", [root / "data/rendered", root / "data/scans"], MIXED)
    for c in ("segmentation", "depth"):   # frozen by hash with the benchmark; not loaded by these tests
        d = root / "foundation/detectors" / c
        d.mkdir(parents=True)
        (d / "detector_config.json").write_text(json.dumps({"condition": c}))
    return {"validation": val, "train": train}


def test_each_condition_is_frozen_on_the_validation_scans_that_have_it(project, tmp_path):
    """Mixed deployment: each condition gets the first max_scans validation scans that have it, so
    the clinic scans are in the benchmark of their conditions; scan i of a condition's list is
    sampled with seed + i, and its store holds its photos, images and label maps."""
    from PIL import Image

    from ctrlora.data.files import read_png
    from ctrlora.data.pairs import read_pairs
    from pipelines.registry import frozen_benchmark as B

    root = tmp_path / "p"
    clinic = _mixed(root, project, rendered=True)
    _params(root, base=MIXED[:3], max_scans=4)
    logs: list[str] = []
    m = B.freeze(root, log=logs.append)
    prepared = root / "data/prepared"
    rows = {c: {r["scan_id"]: r for r in read_pairs(prepared, c, "validation")} for c in MIXED}
    want = {c: sorted(rows[c])[:4] for c in MIXED}
    assert m["condition_scans"] == want and m["conditions"] == list(MIXED) and m["refused"] == {}
    assert m["scan_ids"] == sorted(set().union(*map(set, want.values())))
    assert all(len(ids) == 4 for ids in want.values())   # each list full, whatever the others hold
    # the clinic scans decide the promotions of the conditions they have, and only of those
    seg_only, seg_depth, photo_only = clinic["validation"]
    assert {seg_only, seg_depth} <= set(want["segmentation"]) and photo_only not in want["segmentation"]
    assert seg_depth in want["depth"] and seg_only not in want["depth"]
    assert set(clinic["validation"]) <= set(want["canny"])
    assert not set(clinic["validation"]) & set(want["lighting"])
    assert clinic["train"][0] not in m["scan_ids"]
    assert "segmentation 4, depth 4, canny 4, lighting 4" in logs[0]

    bench = B.open_benchmark(root)
    for c in MIXED:
        assert bench.scans(c) == want[c]
        data = bench.data(c)
        assert data.scan_ids == want[c]
        # champion and challenger stay paired: row i of c's list is sampled with seed + i
        job = B.benchmark_job(bench, c, 1.0)
        assert (job.n_scans, job.rows) == (4, (0, 1, 2, 3))
        for i, sid in enumerate(want[c]):
            np.testing.assert_array_equal(data.photos[i], read_png(prepared / rows[c][sid]["photo"], "RGB"))
            np.testing.assert_array_equal(data.conditions[c][i], read_png(prepared / rows[c][sid]["condition"], "RGB"))
    labels = bench.data("segmentation").labels
    mask = np.asarray(Image.open(root / "data/scans" / seg_only / "segmentation.png"))
    np.testing.assert_array_equal(labels[want["segmentation"].index(seg_only)], mask)
    assert f"labels/{seg_only}/segmentation.png" in m["files"]
    assert f"labels/{photo_only}/segmentation.png" not in m["files"]


def test_a_condition_without_validation_scans_is_refused_alone(project, tracking, tmp_path, monkeypatch, capsys):
    """Clinic scans alone (no lighting map anywhere, one depth map in validation): segmentation
    and canny are frozen; lighting (no scan) and depth (one scan: no paired interval) are left
    out by name, and their comparisons fail with that reason while the champion stays. With no
    condition left, freezing is refused, naming each."""
    from pipelines.registry import frozen_benchmark as B

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "p"
    clinic = _mixed(root, project, rendered=False)
    _params(root, base=MIXED[:3], max_scans=4)
    logs: list[str] = []
    strict = {"rule": "superiority", "min_delta": 0.0}
    # the deployment's first registration freezes v1 itself
    with B.gate_for(root, strict, log=logs.append) as judge:
        assert isinstance(judge, B.BenchmarkGate)
        m = judge.bench.manifest
        assert m["conditions"] == ["segmentation", "canny"]
        assert m["condition_scans"]["segmentation"] == sorted(clinic["validation"][:2])
        assert m["condition_scans"]["canny"] == sorted(clinic["validation"])
        assert set(m["refused"]) == {"depth", "lighting"}
        assert m["refused"]["lighting"].startswith("0 validation scans with 'lighting'")
        assert m["refused"]["depth"].startswith("1 validation scan with 'depth'")
        assert any("no 'lighting' benchmark: 0 validation scans" in line for line in logs)
        with pytest.raises(B.BenchmarkError, match=r"no 'lighting' scans: 0 validation scans with 'lighting'"):
            judge.bench.data("lighting")
        assert _register(root, 1, "a", judge).decision == "champion"
        kept = _register(root, 2, "b", judge)
    assert kept.decision == "challenger" and kept.champion == "1"
    assert "comparison of v2 failed" in kept.reason and "no 'lighting' scans" in kept.reason
    capsys.readouterr()
    assert B.main(["show", "--json", "--repo", str(root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["scans_per_condition"] == {"segmentation": 2, "canny": 3} and set(shown["refused"]) == {"depth", "lighting"}

    _params(root, adapters=("lighting",))
    shutil.rmtree(root / "frozen_benchmark")
    with pytest.raises(B.BenchmarkError, match=r"no condition has a benchmark: lighting: 0 validation scans"):
        B.freeze(root, log=lambda m: None)
    _params(root, adapters=("depth", "lighting"))
    with pytest.raises(B.BenchmarkError, match=r"depth: 1 validation scan .*; lighting: 0 validation scans"):
        B.freeze(root, log=lambda m: None)


def test_a_manifest_of_one_scan_list_loads_and_compares_as_before(project, tmp_path):
    """A manifest written before the lists were kept per condition (one ``scan_ids`` for every
    condition, no ``condition_scans``) still opens, verifies and compares: the same scans, seeds,
    images and scores as the per-condition manifest of the same scans."""
    from pipelines.registry import frozen_benchmark as B

    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    new = B.freeze(root, log=lambda m: None)
    old = {k: new[k] for k in OLD_LAYOUT}
    old.update(version=2, previous=1, reason="the layout of one scan list")
    (root / "frozen_benchmark/v2.json").write_text(json.dumps(old, indent=1) + "\n")
    per, one = B.open_benchmark(root, 1), B.open_benchmark(root, 2)
    assert "condition_scans" not in one.manifest and one.scans("lighting") == old["scan_ids"] == per.scans("lighting")
    assert B.benchmark_job(one, "lighting", 1.5) == B.benchmark_job(per, "lighting", 1.5)
    with pytest.raises(B.BenchmarkError, match=r"no 'depth' scans \(it holds \['lighting'\]\)"):
        one.scans("depth")
    parts = {k: {"backbone": root / "models/backbone", "base": root / "models/base",
                 "adapter": root / "models/adapters" / f"lighting-{k}"} for k in (1, 2)}
    a = B.compare(per, "lighting", parts[1], parts[2], weight=1.0)
    b = B.compare(one, "lighting", parts[1], parts[2], weight=1.0)
    for side in ("champion", "challenger"):
        np.testing.assert_array_equal(a.images[side], b.images[side])
        np.testing.assert_array_equal(getattr(a, side), getattr(b, side))
    assert (a.interval.value, a.interval.low, a.interval.high, a.interval.n) == \
        (b.interval.value, b.interval.low, b.interval.high, b.interval.n)
    # a per-condition manifest that contradicts itself is refused, naming the file
    broken = {**new, "version": 3, "condition_scans": {"lighting": new["scan_ids"][:-1]}}
    (root / "frozen_benchmark/v3.json").write_text(json.dumps(broken))
    with pytest.raises(B.BenchmarkError, match=r"v3\.json: the 'lighting' pairs rows are not the scans"):
        B.open_benchmark(root, 3)


def _resaved_twin(root: Path, k: int) -> str:
    """``lighting-<k>b``: adapter ``lighting-<k>`` with the same tensors in a file of other bytes."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ctrlora.models.adapters import ADAPTER_WEIGHTS

    src, twin = root / "models/adapters" / f"lighting-{k}", root / "models/adapters" / f"lighting-{k}b"
    shutil.copytree(src, twin)
    f = twin / ADAPTER_WEIGHTS
    with safe_open(str(f), framework="pt") as h:
        meta = dict(h.metadata() or {})
    save_file(load_file(str(f)), str(f), metadata={**meta, "resaved": "1"})
    assert f.read_bytes() != (src / ADAPTER_WEIGHTS).read_bytes()
    return f"{k}b"


def _register(root: Path, k: int | str, dataset: str, judge, recipe=None):
    from pipelines.registry.registration import register_adapter

    return register_adapter(
        "lighting", root / "models/adapters" / f"lighting-{k}", dataset_hash=dataset * 32 + ".dir",
        base_hash="b" * 64, backbone_dir=root / "models/backbone", base_dir=root / "models/base",
        metrics={"fidelity": 0.5}, git_commit="c0ffee", dataset_path=root / "data/prepared",
        judge=judge, recipe=recipe)


@pytest.fixture
def splits_read(monkeypatch):
    """Every split the prepared data is read at (pairs index and evaluation loader), recorded."""
    import ctrlora.data.pairs as pairs
    import ctrlora.evaluation.loading as loading

    seen: list[str] = []
    real_pairs, real_split = pairs.read_pairs, loading.load_split

    def read_pairs(root, condition, split=None, *a, **k):
        seen.append(str(split))
        return real_pairs(root, condition, split, *a, **k)

    def load_split(root, split, *a, **k):
        seen.append(str(split))
        return real_split(root, split, *a, **k)

    monkeypatch.setattr(pairs, "read_pairs", read_pairs)
    monkeypatch.setattr(loading, "load_split", load_split)
    return seen


def test_gate_scores_both_in_one_run_and_moves_only_on_evidence(project, tracking, tmp_path, splits_read):
    from mlflow import MlflowClient
    from PIL import Image

    from pipelines.registry import frozen_benchmark as B

    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    B.freeze(root, log=lambda m: None)
    client = MlflowClient()
    name = "ctrlora-lighting"
    strict = {"rule": "superiority", "min_delta": 0.0}

    with B.gate_for(root, strict) as judge:
        first = _register(root, 1, "a", judge)
        assert (first.decision, first.champion) == ("champion", "1")
        assert "no champion yet" in first.reason and first.tags["benchmark_version"] == "1"
        # the same tensors in a file of other bytes (re-saved with one more metadata key), as if
        # retrained on other data to the same weights: identical on every scan, a tie (the very
        # same file on the same base would be the same version: no comparison at all)
        tie = _register(root, _resaved_twin(root, 1), "b", judge)
    assert tie.created and tie.decision == "challenger" and tie.champion == "1"
    assert "tie" in tie.reason and "benchmark v1" in tie.reason
    mv = client.get_model_version(name, tie.version)
    assert mv.tags["gate_delta"] == "0.0" and mv.tags["benchmark_version"] == "1"
    # a version without a recipe is served at weight 1, so it is compared at weight 1
    assert mv.tags["gate_weight"] == "1.0" and "at residual weight 1:" in tie.reason
    assert mv.tags["gate_champion_version"] == "1" and mv.tags["gate_n_scans"] == "6"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    # a different adapter: both generated and scored now; the logged interval decides
    with B.gate_for(root, strict) as judge:
        other = _register(root, 2, "c", judge)
    mv = client.get_model_version(name, other.version)
    low, high = float(mv.tags["gate_low"]), float(mv.tags["gate_high"])
    delta = float(mv.tags["gate_delta"])
    assert low <= delta <= high and low < high
    assert (other.decision == "champion") == (low > 0.0)
    run = client.get_run(other.run_id)
    assert run.data.tags["benchmark_version"] == "1" and run.data.tags["gate_reason"] == other.reason
    assert run.data.metrics["gate_low"] == pytest.approx(low, abs=1e-6)
    files = {a.path for a in client.list_artifacts(other.run_id, "gate")}
    grid_name = f"gate/lighting_v1_vs_v{other.version}.png"
    assert grid_name in files and "gate/lighting_per_scan.csv" in files
    assert mv.tags["gate_grid"] == f"runs:/{other.run_id}/{grid_name}"
    local = Path(client.download_artifacts(other.run_id, grid_name, str(tmp_path / "dl")))
    assert Image.open(local).size[0] >= 3 * SIZE  # condition | champion | challenger
    csv = Path(client.download_artifacts(other.run_id, "gate/lighting_per_scan.csv", str(tmp_path / "dl")))
    lines = csv.read_text().splitlines()
    assert lines[0] == "scan_id,champion,challenger" and len(lines) == 7
    diffs = np.array([float(x.split(",")[2]) - float(x.split(",")[1]) for x in lines[1:]])
    assert diffs.mean() == pytest.approx(delta, abs=1e-5)

    assert mv.tags["gate_tie"] == ("true" if np.all(diffs == 0) else "false")

    # a promotion by hand decides on the paired comparison the version carries for exactly this
    # champion and benchmark version (no second generation), never on stored means
    from pipelines.registry.registration import promote

    with B.gate_for(root, strict) as judge:
        again = promote("lighting", other.version, gate=strict, judge=judge)
    assert again.promoted == (low > 0.0)
    if other.decision != "champion":
        assert "recorded at registration" in again.reason
    # against another champion the recorded comparison does not apply: it is run now
    third = _register(root, 3, "d", None)          # no judge: registered, never compared
    assert third.decision == "challenger"
    champion_before = str(client.get_model_version_by_alias(name, "champion").version)
    with B.gate_for(root, strict) as judge:
        ran = promote("lighting", third.version, gate=strict, judge=judge)
    tags = client.get_model_version(name, third.version).tags
    assert tags["gate_champion_version"] == champion_before and "gate_low" in tags
    assert ran.promoted == (float(tags["gate_low"]) > 0.0)
    assert "benchmark v1" in ran.reason and "recorded at registration" not in ran.reason
    # a gate that would let a worse version through is refused outright
    with pytest.raises(ValueError, match="min_delta"):
        B.gate_for(root, {"rule": "superiority", "min_delta": -1.0})
    champion_now = str(client.get_model_version_by_alias(name, "champion").version)

    # a benchmark that no longer verifies: the comparison is refused, the alias stays
    (root / "data/frozen_benchmark/v1/detectors/lighting/detector_config.json").write_text("{}")
    with B.gate_for(root, strict, log=lambda m: None) as judge:
        refused = _register(root, _resaved_twin(root, 2), "e", judge)   # not a version yet
    assert refused.decision == "challenger" and refused.champion == champion_now
    assert "benchmark unusable" in refused.reason and "detector_config.json" in refused.reason
    tags = client.get_model_version(name, refused.version).tags
    assert tags["benchmark_version"] == "1" and "detector_config.json" in tags["benchmark_error"]
    # freezing, every comparison and every promotion read the validation split: never the test
    # split, which only the evaluation reads
    assert splits_read and set(splits_read) == {"validation"}, sorted(set(splits_read))


def _draw(root: Path, bench, k: int, weight: float) -> np.ndarray:
    """What the evaluation's own generation of one pass draws for adapter ``lighting-<k>`` on the
    benchmark scans at residual weight ``weight`` (its sampler and seeds; nothing of the gate's)."""
    from ctrlora.device import default_device
    from ctrlora.evaluation.loading import load_models
    from ctrlora.evaluation.run import GenerationJob, run_job
    from ctrlora.sampling import CtrLoRAPipeline

    data, sampling = bench.data("lighting"), bench.sampling()
    models = load_models(root / "models/backbone", root / "models/base",
                         {"lighting": root / "models/adapters" / f"lighting-{k}"})
    pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet).to(default_device())
    pipe.set_progress_bar_config(disable=True)
    job = GenerationJob(sampling.guidance_scale, len(data), "lighting", {"lighting": ("lighting", weight, "lighting")},
                        tuple(range(len(data))))
    return run_job(pipe, data, job, sampling)


def test_gate_samples_both_sides_at_the_challengers_recipe_weight(project, tracking, tmp_path, monkeypatch):
    """The gate draws champion and challenger at the residual weight the challenger's recipe
    states (what the alias serves if it moves), through the evaluation's own generation; the
    weight is recorded with the comparison, and a comparison stored at another weight (or before
    weights were recorded: weight 1) is not reused by a promotion."""
    from mlflow import MlflowClient
    from PIL import Image

    from ctrlora.evaluation.grids import save_grid
    from ctrlora.evaluation.loading import condition_cell
    from ctrlora.evaluation.scoring import per_scan_fidelity
    from pipelines.registry import frozen_benchmark as B
    from pipelines.registry.registration import promote

    # a registry of its own: this test's first version must be the model's first
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    B.freeze(root, log=lambda m: None)
    bench = B.open_benchmark(root)
    data = bench.data("lighting")
    drawn = {(k, w): _draw(root, bench, k, w) for k in (1, 2) for w in (1.0, 2.0)}
    assert not np.array_equal(drawn[(2, 2.0)], drawn[(2, 1.0)])   # the weight changes the image

    # the comparison itself: both sides are exactly the evaluation's draws at the given weight
    parts = {k: {"backbone": root / "models/backbone", "base": root / "models/base",
                 "adapter": root / "models/adapters" / f"lighting-{k}"} for k in (1, 2)}
    res = B.compare(bench, "lighting", parts[1], parts[2], weight=2.0)
    assert res.weight == 2.0
    assert np.array_equal(res.images["champion"], drawn[(1, 2.0)])
    assert np.array_equal(res.images["challenger"], drawn[(2, 2.0)])
    assert not np.array_equal(res.images["challenger"], drawn[(2, 1.0)])
    np.testing.assert_array_equal(res.challenger, per_scan_fidelity("lighting", drawn[(2, 2.0)], data,
                                                                   bench.detectors("lighting")))

    # registration: the champion's recipe says weight 1, the challenger's 2; both sides at 2
    recipe = {"scheduler": "dpm_karras", "steps": 2, "guidance_scale": 1.0}
    never = {"rule": "superiority", "min_delta": 1.0}   # no SSIM gain clears it: v2 stays challenger
    client = MlflowClient()
    name = "ctrlora-lighting"
    with B.gate_for(root, never) as judge:
        assert _register(root, 1, "a", judge, {**recipe, "weight": 1.0}).decision == "champion"
        reg = _register(root, 2, "c", judge, {**recipe, "weight": 2.0})
    assert reg.decision == "challenger"
    assert "at residual weight 2 (challenger's recipe; champion v1's recipe says 1)" in reg.reason
    mv = client.get_model_version(name, reg.version)
    assert mv.tags["gate_weight"] == "2.0" and json.loads(mv.tags["recipe"])["weight"] == 2.0
    run = client.get_run(reg.run_id)
    assert run.data.tags["gate_weight"] == "2.0" and run.data.metrics["gate_weight"] == 2.0
    # the gate's images, as its grid shows them: the weight-2 draws, not the weight-1 ones
    rows = int(bench.manifest["grid_rows"])
    logged = Path(client.download_artifacts(reg.run_id, f"gate/lighting_v1_vs_v{reg.version}.png",
                                            str(tmp_path / "dl")))

    def grid(weight: float) -> np.ndarray:
        out = save_grid([[condition_cell("lighting", data, i), drawn[(1, weight)][i], drawn[(2, weight)][i]]
                         for i in range(rows)], tmp_path / f"grid-{weight}.png",
                        titles=["lighting", "champion v1", f"challenger v{reg.version}"])
        return np.asarray(Image.open(out))

    assert np.array_equal(np.asarray(Image.open(logged)), grid(2.0))
    assert not np.array_equal(np.asarray(Image.open(logged)), grid(1.0))
    csv = Path(client.download_artifacts(reg.run_id, "gate/lighting_per_scan.csv", str(tmp_path / "dl")))
    per_scan = np.array([[float(x) for x in line.split(",")[1:]] for line in csv.read_text().splitlines()[1:]])
    np.testing.assert_allclose(per_scan[:, 1], res.challenger, atol=1e-6)

    # a promotion at the same weight reuses the recorded comparison ...
    with B.gate_for(root, never) as judge:
        kept = promote("lighting", reg.version, gate=never, judge=judge)
    assert not kept.promoted and "recorded at registration" in kept.reason and "residual weight 2" in kept.reason
    # ... one stored at weight 1 is not reused for this weight-2 version: it is run again
    for stored in ("1.0", None):   # None: recorded before comparisons carried their weight
        if stored is None:
            client.delete_model_version_tag(name, reg.version, "gate_weight")
        else:
            client.set_model_version_tag(name, reg.version, "gate_weight", stored)
        with B.gate_for(root, never) as judge:
            again = promote("lighting", reg.version, gate=never, judge=judge)
        assert not again.promoted and "recorded at registration" not in again.reason
        assert "at residual weight 2" in again.reason
        assert client.get_model_version(name, reg.version).tags["gate_weight"] == "2.0"
