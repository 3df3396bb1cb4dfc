"""A dental team's own export through the real production graph, at toy scale.

A copy of this repository becomes a fresh git + DVC repo with tiny parameters (test_e2e's scale).
A clinic export is made here from rendered scans, the way a clinic's tools would hand it over:
3:2 photographs (JPEG with identifying EXIF, one stored sideways, one PNG with text chunks) named
after patients, COCO polygons traced from the segmentation masks under the clinic's own category
names, a label PNG, 16-bit depth maps, a normal map, a captions.csv, plus the usual debris (a
map of the wrong size, a depth map without photograph, a stray text file).

The user's commands then run for real: ``ctrlora import-clinic`` (a subprocess, reading the toy's
params.yaml), and the Prefect retrain flow (ingest -> dvc repro prepare -> every stage of
dvc.yaml -> registration in a sqlite MLflow store). The tests check what a team would ask:

* nothing lost: every file of the export is a scan, a quarantined original with a reason naming
  the file and the rule, or reported as skipped;
* no identifier (file names, EXIF and PNG text values) in any output outside the quarantine;
* the clinic scans are in the pairs, the embed cache and so the adapters' training data, with
  the captions of captions.csv, and the registered versions carry the dataset hashes DVC recorded;
* evaluate scores each condition on the test scans that have it, clinic scans included;
* the promotion benchmark frozen at the first registration holds, per condition, the validation
  scans that have it, clinic scans included.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from _project_helpers import toy_project
from PIL import Image, PngImagePlugin

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from skimage import measure  # noqa: E402

from ctrlora.data.captions import caption_from_meta  # noqa: E402
from ctrlora.data.labels import LABELS  # noqa: E402
from ctrlora.data.photos import PHOTO_CAPTION, photo_scan_id  # noqa: E402
from ctrlora.data.prepare import split_of  # noqa: E402
from ctrlora.data.render import RenderConfig, render_scan  # noqa: E402
from _clinic_helpers import identifying_exif  # noqa: E402

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

REPO = Path(__file__).resolve().parents[2]
RES = 64
TEST_FRACTION, VALIDATION_FRACTION = 0.3, 0.1
RENDERED = 8  # r0-00000..07: validation 0, 3 (lighting's benchmark needs two); test 1, 2; train 4..7
CONDITIONS = ["segmentation", "depth", "canny", "palette", "lighting", "normal"]
# planted in the photographs' metadata: none of it may reach an output outside quarantine
SECRETS = ["Jane Patient", "SERIAL-4711", "PhoneCo", "Model X9", "2024:05:01 10:11:12", "Anna Mueller",
           "Referral note", "52/1 22/1"]
# the clinic's own category names, mapped through params clinic.categories; Caries is ignored
CLINIC_NAMES = {"Gingiva": "gingiva", "Upper incisor": "upper_incisor", "Upper canine": "upper_canine",
                "Upper premolar": "upper_premolar", "Upper molar": "upper_molar", "Lower incisor": "lower_incisor",
                "Lower canine": "lower_canine", "Lower premolar": "lower_premolar", "Lower molar": "lower_molar",
                "Caries": "background"}
CATEGORIES = [{"id": 100 + i, "name": n, "supercategory": "dental"} for i, n in enumerate(CLINIC_NAMES)]


@dataclass(frozen=True)
class Photo:
    """One photograph of the export: its file name, the rendered scan it shows, the split its id
    must fall in (reached by varying a metadata value, which changes the file's bytes and so its
    id), and what the export holds for it."""

    stem: str
    ext: str
    seed: int
    split: str | None
    segmentation: str | None = None  # coco | png | None
    depth: bool = False
    normal: bool = False
    caption: bool = False
    orientation: int = 1  # 6: stored sideways, as phones do; the maps are drawn upright
    broken_depth: bool = False  # a depth map of another size: the photograph is refused

    @property
    def name(self) -> str:
        return f"{self.stem}.{self.ext}"

    @property
    def maps(self) -> list[str]:
        return [m for m, on in (("segmentation", self.segmentation), ("depth", self.depth),
                                ("normal", self.normal)) if on]


PHOTOS = [
    Photo("Jane_Patient_IMG_0001", "jpg", 11, "train", "coco", caption=True),  # a mask only: does it train?
    Photo("DOE_John_2024-05-01_frontal", "jpg", 12, "test", "coco", depth=True),
    Photo("mueller-anna_0003", "png", 13, "test", "png", caption=True),  # a mask only, in test
    Photo("Smith_Maria_0004", "jpg", 14, "validation", caption=True),  # no map at all: benchmark of canny, palette
    Photo("Patel_R_0005", "jpg", 15, "train", "coco", depth=True, normal=True, orientation=6),
    Photo("Okafor_Chi_0006", "jpg", 16, None, "coco", depth=True, broken_depth=True),
]
ORPHAN = "depth/ghost_Brown_0007.png"
STRAY = "photos/Thumbs_Jane_Patient.txt"


# ------------------------------------------------------------------------ the clinic's export

def _encode(photo: Photo, upright: np.ndarray, unique: int) -> bytes:
    buf = io.BytesIO()
    if photo.ext == "png":
        text = PngImagePlugin.PngInfo()
        text.add_text("Author", "Anna Mueller")
        text.add_text("Comment", f"Referral note {unique}")
        Image.fromarray(upright).save(buf, format="PNG", pnginfo=text)
    else:
        stored = upright if photo.orientation == 1 else np.ascontiguousarray(np.rot90(upright, k=1))
        Image.fromarray(stored).save(buf, format="JPEG", quality=92, exif=identifying_exif(photo.orientation, unique),
                                     comment=b"Referral note")
    return buf.getvalue()


def _photo_bytes(photo: Photo, upright: np.ndarray) -> bytes:
    """The file, its metadata varied until its scan id falls in ``photo.split``."""
    for unique in range(1000):
        data = _encode(photo, upright, unique)
        if photo.split is None or split_of(photo_scan_id(data), TEST_FRACTION, VALIDATION_FRACTION) == photo.split:
            return data
    raise AssertionError(f"no encoding of {photo.name} falls in the {photo.split} split")


def _to_3_2(arr: np.ndarray, resample) -> np.ndarray:
    """A square rendering stretched to a 3:2 landscape photograph's frame (144 × 96)."""
    h, w = arr.shape[:2]
    return np.asarray(Image.fromarray(arr).resize((w * 3 // 2, h), resample))


def coco_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons of a binary mask: each 4-connected component's outline traced by marching
    squares (``skimage.measure.find_contours`` at level 0.5 on the zero-padded mask, i.e. halfway
    between inside and outside pixel centres), shifted by half a pixel because COCO puts pixel
    (x, y)'s centre at (x + 0.5, y + 0.5). pycocotools rasterises them back to the mask but a
    handful of pixels; holes come back filled, which the painting order of the annotations
    (teeth after the gingiva around them) makes harmless."""
    polys = []
    components = measure.label(mask, connectivity=1)
    for k in range(1, int(components.max()) + 1):
        padded = np.pad(components == k, 1).astype(np.float32)
        for contour in measure.find_contours(padded, 0.5):
            xy = np.flip(contour - 1 + 0.5, axis=1)
            if len(xy) >= 3:
                polys.append([round(float(v), 2) for v in xy.ravel()])
    return polys


def _interior_tooth_pixel(seg: np.ndarray) -> tuple[int, int]:
    """(x, y) of a tooth pixel whose 9 × 9 neighbourhood is that tooth only."""
    h, w = seg.shape
    for y in range(4, h - 4):
        for x in range(4, w - 4):
            window = seg[y - 4:y + 5, x - 4:x + 5]
            if seg[y, x] >= 2 and (window == seg[y, x]).all():
                return x, y
    raise AssertionError("no tooth with a 9 × 9 interior")


def write_export(root: Path) -> dict:
    """The export (layout of docs/your-data.md); returns what the tests need to know of it."""
    for sub in ("photos", "masks", "depth", "normal"):
        (root / sub).mkdir(parents=True)
    by_name = {v: k for k, v in CLINIC_NAMES.items() if v != "background"}
    cat_id = {c["name"]: c["id"] for c in CATEGORIES}
    images, annotations, captions, info = [], [], [], {"files": {}, "ids": {}, "upright_labels": {}, "captions": {}}
    for n, photo in enumerate(PHOTOS):
        rs = render_scan(photo.seed, RenderConfig(resolution=96))
        seg = _to_3_2(rs.scan.segmentation, Image.Resampling.NEAREST)
        data = _photo_bytes(photo, _to_3_2(rs.scan.photo, Image.Resampling.LANCZOS))
        (root / "photos" / photo.name).write_bytes(data)
        info["files"][photo.name] = root / "photos" / photo.name
        info["ids"][photo.name] = photo_scan_id(data)
        info["upright_labels"][photo.name] = seg
        h, w = seg.shape
        if photo.segmentation == "coco":
            image_id = 1 + n
            images.append({"id": image_id, "file_name": f"photos/{photo.name}", "width": w, "height": h})
            for label in [1, *range(2, 10)]:  # the gingiva first: the teeth painted over it win
                for poly in coco_polygons(seg == label):
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": cat_id[by_name[LABELS[label].name]], "segmentation": [poly],
                                        "iscrowd": 0})
            if n == 0:  # a finding inside a tooth, last in the file, ignored by the mapping: the tooth stays
                x, y = _interior_tooth_pixel(seg)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id["Caries"],
                                    "segmentation": [[x - 2, y - 2, x + 3, y - 2, x + 3, y + 3, x - 2, y + 3]],
                                    "iscrowd": 0})
                info["caries"] = (x, y, int(seg[y, x]))
        elif photo.segmentation == "png":
            Image.fromarray(seg, mode="L").save(root / "masks" / f"{photo.stem}.png")
        surface = seg > 0
        if photo.depth:
            z = _to_3_2(rs.depth, Image.Resampling.NEAREST)
            depth16 = np.where(surface, np.clip(np.round(z * 65535), 1, 65535), 0).astype(np.uint16)
            if photo.broken_depth:
                depth16 = depth16[:, :-10]
            Image.fromarray(depth16).save(root / "depth" / f"{photo.stem}.png")
        if photo.normal:
            normal = np.where(surface[..., None], _to_3_2(rs.scan.normal, Image.Resampling.NEAREST), 0)
            Image.fromarray(normal.astype(np.uint8)).save(root / "normal" / f"{photo.stem}.png")
        if photo.caption:
            text = caption_from_meta(rs.scan.meta)
            captions.append([photo.name if n % 2 else photo.stem, text])  # by file name or by stem
            info["captions"][photo.name] = text
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": CATEGORIES}))
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], *captions])
    Image.fromarray(np.full((96, 144), 900, np.uint16)).save(root / ORPHAN)
    (root / STRAY).write_text("Jane Patient, referral")
    return info


# ------------------------------------------------------------------------ the toy project

def _tiny_params(params: dict) -> dict:
    p = json.loads(json.dumps(params))
    p["render"].update(n=RENDERED, workers=1)
    p["prepare"].update(test_fraction=TEST_FRACTION, validation_fraction=VALIDATION_FRACTION, workers=1)
    p["clinic"]["categories"] = dict(CLINIC_NAMES)
    tiny_train = {"batch_size": 4, "checkpoint_every": 0, "log_every": 1}
    p["embed"]["batch_size"] = 64
    p["train_base"]["train"].update(max_steps=4, **tiny_train)
    p["train_adapter"]["train"].update(max_steps=2, **tiny_train)
    p["train_adapter"]["max_pairs"] = None
    p["evaluate"].update(max_scans=None, grid_rows=2, guidance=[1.0], bootstrap={"n_boot": 200, "seed": 0},
                         threads=1, progress=False)
    p["evaluate"]["sampling"].update(steps=2, batch_size=8)
    if "workers" in p["evaluate"]:  # generation over processes: not worth starting them for a toy
        p["evaluate"]["workers"] = 1
    p["flows"].update(retries=0, retry_delay_seconds=0)
    p["register"]["benchmark"].update(max_scans=8, grid_rows=2, bootstrap={"n_boot": 200, "seed": 0})
    p["register"]["benchmark"]["sampling"].update(steps=2, batch_size=8)
    return p


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    base = tmp_path_factory.mktemp("clinic-graph")
    # the repo's lock and benchmark manifests describe the repo's scans: the toy makes its own
    project = toy_project(base / "project", _tiny_params(yaml.safe_load((REPO / "params.yaml").read_text())),
                          skip=lambda rel: rel == "dvc.lock" or rel.startswith(("tests/fixtures/",
                                                                                 "frozen_benchmark/")),
                          message="toy project")
    export = base / "export"
    info = write_export(export)
    export_bytes = {p.relative_to(export).as_posix(): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    # the team's command, as docs/your-data.md gives it (the toy's params: clinic.categories)
    imported = subprocess.run([sys.executable, "-m", "ctrlora.cli", "import-clinic", str(export), "--out",
                               "data/incoming"], cwd=project, env=_env(), capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-3000:]
    report = json.loads(imported.stdout)

    from pipelines.orchestration.flows import retrain_on_new_scans

    db = base / "mlflow.db"
    new = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        with prefect_test_harness(server_startup_timeout=None):
            flow = retrain_on_new_scans(str(project))
            from mlflow import MlflowClient

            versions = {c: [MlflowClient().get_model_version(f"ctrlora-{c}", str(v.version))
                            for v in MlflowClient().search_model_versions(f"name='ctrlora-{c}'")]
                        for c in CONDITIONS}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"project": project, "export": export, "info": info, "export_bytes": export_bytes, "report": report,
            "flow": flow, "versions": versions, "db": db}


def _landed(run) -> dict[str, Photo]:
    return {run["info"]["ids"][p.name]: p for p in PHOTOS if not p.broken_depth}


# ------------------------------------------------------------------------ the tests

@pytest.mark.timeout(900)
def test_nothing_lost(run):
    """Every file of the export is in a scan, quarantined untouched with its file and rule, or
    reported as skipped; the export itself was only read."""
    project, report, info = run["project"], run["report"], run["info"]
    landed = _landed(run)
    assert set(report["landed"]) == set(landed)
    assert {sid: sorted(m) for sid, m in report["maps"].items()} == {sid: sorted(p.maps) for sid, p in landed.items()}
    assert report["skipped"] == [STRAY] and report["unmatched_captions"] == 0
    assert run["flow"]["status"] == "retrained"
    assert sorted(run["flow"]["ingest"]["accepted"]) == sorted(landed)
    store = project / "data/scans"
    for sid, photo in landed.items():
        assert sorted(os.listdir(store / sid)) == sorted(["READY", "meta.json", "photo.png",
                                                          *(f"{m}.png" for m in photo.maps)])
    assert [n for n in os.listdir(project / "data/incoming") if not n.startswith(".")] == []

    quarantine = project / "data/quarantine"
    refused = info["ids"]["Okafor_Chi_0006.jpg"]
    (violation,) = report["violations"][refused]
    assert (violation["file"], violation["rule"]) == ("depth/Okafor_Chi_0006.png", "map_size")
    folder = quarantine / report["quarantined"][refused]
    reason = json.loads((folder / "reason.json").read_text())
    assert reason["violations"] == [violation] and reason["source"] == "import-clinic"
    for rel in ("photos/Okafor_Chi_0006.jpg", "depth/Okafor_Chi_0006.png"):
        assert (folder / rel).read_bytes() == run["export_bytes"][rel]
    assert json.loads((folder / "annotations.json").read_text())["annotations"]  # its COCO part
    orphan = [sid for sid in report["violations"] if sid.startswith("orphan-")]
    assert len(orphan) == 1 and report["violations"][orphan[0]][0]["rule"] == "map_without_photo"
    assert (quarantine / report["quarantined"][orphan[0]] / ORPHAN).read_bytes() == run["export_bytes"][ORPHAN]

    # each file of the export, accounted for
    accounted = {STRAY, "annotations.json", "captions.csv"}
    for photo in PHOTOS:
        accounted |= {f"photos/{photo.name}", *(f"{sub}/{photo.stem}.png" for sub, on in
                                                 (("masks", photo.segmentation == "png"), ("depth", photo.depth),
                                                  ("normal", photo.normal)) if on)}
    assert set(run["export_bytes"]) == accounted | {ORPHAN}
    assert {p.relative_to(run["export"]).as_posix(): p.read_bytes()
            for p in run["export"].rglob("*") if p.is_file()} == run["export_bytes"]


def test_masks_and_maps_survive(run):
    """The landed segmentation is the annotators' mask placed by the pad rule (the COCO polygons
    round trip but a few pixels; the ignored Caries region keeps its tooth), 16-bit depth lands."""
    store = run["project"] / "data/scans"
    for sid, photo in _landed(run).items():
        meta = json.loads((store / sid / "meta.json").read_text())
        assert meta["kind"] == "clinic" and meta["geometry"]["aspect"] == "pad" and meta["maps"] == photo.maps
        assert meta["geometry"]["content"] == [64, 43]  # 144 × 96 -> 64 × 43, black bars above and below
        if photo.segmentation:
            full = run["info"]["upright_labels"][photo.name]
            want = np.asarray(Image.fromarray(full).resize((64, 43), Image.Resampling.NEAREST))
            got = np.asarray(Image.open(store / sid / "segmentation.png"))
            assert (got[:10] == 0).all() and (got[53:] == 0).all()
            assert (got[10:53] == want).mean() > 0.99, photo.name
            if photo is PHOTOS[0]:  # the Caries square, mapped to background, did not erase its tooth
                x, y, label = run["info"]["caries"]
                assert got[10 + round(y * 43 / 96), round(x * 64 / 144)] == label
        if photo.depth:
            depth = np.asarray(Image.open(store / sid / "depth.png"))
            assert depth.dtype == np.uint8 and depth[10:53].max() > 100 and (depth[:10] == 0).all()


def test_no_identifier_in_any_output(run):
    """No file name, EXIF or PNG text value of the export in any file of the project (data,
    DVC cache, models, reports, metrics, dvc.lock, benchmark) but the quarantine, nor in the
    registry (its database and the artefacts of the registered models)."""
    project = run["project"]
    needles = [s.lower().encode() for s in SECRETS + [p.stem for p in PHOTOS] + ["ghost_Brown", "Thumbs_Jane"]]

    def git(*args: str) -> set[str]:
        out = subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, text=True).stdout
        return set(out.splitlines())

    # the repository's own files as committed (its tests hold such strings as fixtures) are no output
    code = {project / rel for rel in git("ls-files") - git("diff", "--name-only")}
    skip = {project / "data/quarantine", project / ".git"}
    checked = 0
    for root in (project, run["db"].parent / "mlartifacts"):
        for folder, dirs, files in os.walk(root):  # never into the linked .venv
            here = Path(folder)
            if here in skip:
                dirs.clear()
                continue
            for name in dirs + files:
                assert not any(n.decode() in name.lower() for n in needles), here / name
            for name in files:
                path = here / name
                if path.is_symlink() or path in code:
                    continue
                content = path.read_bytes().lower()
                hit = [n for n in needles if n in content]
                assert not hit, (path, hit)
                checked += 1
    assert checked > 200
    db = run["db"].read_bytes().lower()
    assert not [n for n in needles if n in db]
    assert (run["db"].parent / "mlartifacts").is_dir()


def test_clinic_scans_reach_training(run):
    """The clinic scans are pairs of the conditions their maps give (a mask-only scan: segmentation
    and the derived ones), in the embed cache the trainers read (train split, with the caption of
    captions.csv encoded), and the registered versions carry the dataset hashes of dvc.lock."""
    from ctrlora.data.pairs import read_pairs
    from pipelines.registry.dvclock import dataset_hash_from_lock

    project = run["project"]
    prepared = project / "data/prepared"
    landed = _landed(run)
    derived = {"canny", "palette"}
    for c in CONDITIONS:
        rows = {r["scan_id"]: r for r in read_pairs(prepared, c)}
        want = {sid for sid, p in landed.items() if c in derived or c in p.maps}
        assert set(rows) & set(landed) == want, c
        for sid in want:
            photo = landed[sid]
            assert rows[sid]["split"] == photo.split
            assert rows[sid]["caption"] == run["info"]["captions"].get(photo.name, PHOTO_CAPTION), (c, photo.name)
    index = json.loads((project / "data/embed/index.json").read_text())
    rows_of = {sid: i for i, sid in enumerate(index["scan_ids"])}
    assert set(landed) <= set(rows_of)
    from ctrlora.training.embed import load_embed_cache

    cache = load_embed_cache(project / "data/embed")
    jane = run["info"]["ids"]["Jane_Patient_IMG_0001.jpg"]  # only a segmentation mask
    patel = run["info"]["ids"]["Patel_R_0005.jpg"]
    for c, sid in (("segmentation", jane), ("canny", jane), ("depth", patel), ("normal", patel)):
        train = {cache.scan_ids[int(cache.conditions[c].photo_index[i])] for i in cache.pair_rows(c, "train")}
        assert sid in train, (c, sid)
    assert cache.captions[rows_of[jane]] == run["info"]["captions"]["Jane_Patient_IMG_0001.jpg"]
    default = cache.captions.index(PHOTO_CAPTION)  # a clinic photograph without a caption
    assert not np.allclose(cache.text[rows_of[jane]], cache.text[default])
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train_base"]["outs"] and lock["stages"]["evaluate"]["outs"]
    for c in CONDITIONS:
        (v1,) = run["versions"][c]
        assert v1.tags["dataset_hash"] == dataset_hash_from_lock(project, c), c


def test_evaluate_counts_clinic_scans_per_condition(run):
    """Each condition is scored on every test scan that has it: rendered ones for all, clinic ones
    for their maps and the derived conditions."""
    project = run["project"]
    splits = json.loads((project / "data/prepared/meta/splits.json").read_text())
    rendered_test = [s for s in splits["test"] if s.startswith("r")]
    assert len(rendered_test) == 2
    clinic_test = {sid: p for sid, p in _landed(run).items() if p.split == "test"}
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    per_scan = (project / "reports/evaluate/per_scan.csv").read_text().splitlines()[1:]
    for c in CONDITIONS:
        want = set(rendered_test) | {sid for sid, p in clinic_test.items() if c in ("canny", "palette") or c in p.maps}
        assert metrics[c]["n_scans"] == len(want), (c, metrics[c]["n_scans"], len(want))
        scored = {r.split(",")[3] for r in per_scan if r.split(",")[1] == c and r.split(",")[2] == c}
        assert scored == want, c


def test_clinic_scans_are_in_the_benchmark_of_their_conditions(run):
    """The benchmark the first registration froze holds, for each condition, the first max_scans
    validation scans that have it: the clinic photograph without maps in canny's and palette's
    (conditions of the photograph itself), the rendered ones in every condition's."""
    from ctrlora.data.pairs import read_pairs

    project = run["project"]
    (manifest,) = (project / "frozen_benchmark").glob("v*.json")
    m = json.loads(manifest.read_text())
    assert m["conditions"] == CONDITIONS and m["refused"] == {}
    for c in CONDITIONS:
        want = sorted(r["scan_id"] for r in read_pairs(project / "data/prepared", c, "validation"))[:8]
        assert m["condition_scans"][c] == want, c
    clinic = {sid for sid, p in _landed(run).items() if p.split == "validation"}
    assert clinic == {run["info"]["ids"]["Smith_Maria_0004.jpg"]}
    assert {c for c, ids in m["condition_scans"].items() if clinic & set(ids)} == {"canny", "palette"}
    rendered = {s for s in json.loads((project / "data/prepared/meta/splits.json").read_text())["validation"]
                if s.startswith("r")}
    assert len(rendered) == 2 and all(rendered <= set(ids) for ids in m["condition_scans"].values())
