"""A clinic's export in: JPEG / PNG photographs with identifying metadata and file names, COCO
polygons and RLE, label PNGs (index, palette, colour), 16-bit depth, normals and captions, through
the importer, the real ingestion (great-expectations contract) and prepare."""
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ctrlora.cli import main as cli_main
from ctrlora.data.captions import caption_from_meta
from ctrlora.data.clinic import ClinicConfig, ClinicExportError, import_clinic
from ctrlora.data.files import png_bytes, read_png
from ctrlora.data.ingest import IngestConfig, ingest
from ctrlora.data.labels import LABEL_IDS, LABELS
from ctrlora.data.pairs import read_pairs
from ctrlora.data.photos import PHOTO_CAPTION, photo_scan_id
from ctrlora.data.prepare import PrepareConfig, prepare
from ctrlora.data.render import render_scan
from ctrlora.data.scan import meta_bytes, write_scan

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from _clinic_helpers import identifying_exif  # noqa: E402

# pycocotools' own decode, used here as the reference, trips numpy 2's __array__(copy=...) deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
RES = 64
# planted in the photographs' metadata; none of it may appear outside quarantine
SECRETS = [b"Jane Patient", b"SERIAL-4711", b"PhoneCo", b"Model X9", b"2024:05:01 10:11:12", b"Exif\x00\x00",
           b"Referral note"]
# the export's file stems carry patients' names: none may appear outside quarantine either
STEMS = {"A": "Jane_Patient_IMG_0001", "B": "Doe_John_0002", "C": "ana-maria_0003", "D": "colour_mask_0004",
         "E": "fdi_0005", "F": "bigmask_0006", "G": "palette_0007", "H": "plain_0008"}
CATEGORIES = [*({"id": lab.id + 1, "name": lab.name} for lab in LABELS.values()), {"id": 99, "name": "tooth_11"}]
CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 220, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w].copy()


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _pad_expected(full: np.ndarray, fill=0) -> np.ndarray:
    """``full`` placed by the pad rule, computed here: longer side to RES (nearest), centred."""
    h, w = full.shape[:2]
    cw, ch = round(w * RES / max(w, h)), round(h * RES / max(w, h))
    small = np.asarray(Image.fromarray(full).resize((cw, ch), Image.Resampling.NEAREST))
    out = np.full((RES, RES) + full.shape[2:], fill, np.uint8)
    oy, ox = (RES - ch) // 2, (RES - cw) // 2
    out[oy:oy + ch, ox:ox + cw] = small
    return out


def _write_export(root: Path) -> dict:
    """The clinic export the tests import; returns what the tests need to know about it."""
    for sub in ("photos", "masks", "depth", "normal"):
        (root / sub).mkdir(parents=True)
    info: dict = {"files": {}}

    def photo(key: str, ext: str, arr: np.ndarray, **save) -> Path:
        path = root / "photos" / f"{STEMS[key]}.{ext}"
        Image.fromarray(arr).save(path, **save)
        info["files"][key] = path
        return path

    # A: a 3:2 phone photograph with every metadata block; COCO polygons, overlapping
    photo("A", "jpg", _texture(64, 96, 1), format="JPEG", quality=95, exif=identifying_exif(1),
          comment=b"Referral note")
    # B: stored sideways (orientation 6): upright 96×64, as its COCO entry says; polygon + RLE
    upright_b = _texture(64, 96, 2)
    photo("B", "jpg", np.ascontiguousarray(np.rot90(upright_b, k=1)), format="JPEG", quality=95, exif=identifying_exif(6))
    # C: a PNG with text chunks; index label PNG (L), 16-bit depth, normals
    text = PngImagePlugin.PngInfo()
    text.add_text("Author", "Jane Patient")
    photo("C", "png", _texture(96, 128, 3), format="PNG", pnginfo=text)
    # D: colour mask in the label table's display colours
    photo("D", "jpg", _texture(64, 80, 4), format="JPEG", exif=identifying_exif(1))
    # E: COCO annotation of a category the mapping does not know (FDI-style)
    photo("E", "jpg", _texture(64, 96, 5), format="JPEG", exif=identifying_exif(1))
    # F: a mask of another size than its photograph
    photo("F", "jpg", _texture(64, 96, 6), format="JPEG", exif=identifying_exif(1))
    # G: palette PNG whose indices are the ids (its colours are not label colours)
    photo("G", "png", _texture(64, 64, 7), format="PNG")
    # H: a photograph alone, no caption
    photo("H", "jpg", _texture(70, 90, 8), format="JPEG", exif=identifying_exif(1))
    # a byte copy of A under another name: the same scan id, lands once
    (root / "photos" / "copy_of_A.jpg").write_bytes(info["files"]["A"].read_bytes())
    (root / "photos" / "notes.txt").write_text("Jane Patient's referral")

    # COCO: A polygons (incisor, then an overlapping canine: the canine wins; a molar at the far
    # left, cut by a centre crop), B polygon + compressed RLE, E an unmapped category, and an
    # image entry whose file is not in the export
    rle_mask = np.zeros((64, 96), np.uint8)
    rle_mask[40:60, 70:90] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    images = [{"id": 1, "file_name": f"photos/{STEMS['A']}.jpg", "width": 96, "height": 64},
              {"id": 2, "file_name": f"{STEMS['B']}.jpg", "width": 96, "height": 64},
              {"id": 5, "file_name": f"{STEMS['E']}.jpg", "width": 96, "height": 64},
              {"id": 9, "file_name": "missing_Smith_0009.jpg", "width": 96, "height": 64}]
    anns = [
        {"id": 10, "image_id": 1, "category_id": CAT_ID["gingiva"], "segmentation": _rect(0, 0, 96, 12), "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": CAT_ID["upper_incisor"], "segmentation": _rect(40, 10, 56, 40), "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": CAT_ID["upper_canine"], "segmentation": _rect(50, 15, 62, 38), "iscrowd": 0},
        {"id": 13, "image_id": 1, "category_id": CAT_ID["upper_molar"],
         "segmentation": [[2, 12, 14, 12, 14, 36, 8, 40, 2, 36]], "iscrowd": 0},
        {"id": 20, "image_id": 2, "category_id": CAT_ID["lower_incisor"], "segmentation": _rect(20, 30, 40, 50), "iscrowd": 0},
        {"id": 21, "image_id": 2, "category_id": CAT_ID["lower_molar"], "iscrowd": 1,
         "segmentation": {"size": [64, 96], "counts": rle["counts"].decode("ascii")}},
        {"id": 50, "image_id": 5, "category_id": CAT_ID["tooth_11"], "segmentation": _rect(10, 10, 30, 30), "iscrowd": 0},
        {"id": 90, "image_id": 9, "category_id": CAT_ID["upper_molar"], "segmentation": _rect(1, 1, 9, 9), "iscrowd": 0},
    ]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))

    # C: index label PNG, 16-bit depth (left third no surface), normals (left third none)
    ids_c = np.zeros((96, 128), np.uint8)
    ids_c[:20] = LABEL_IDS["gingiva"]
    ids_c[30:70, 40:70] = LABEL_IDS["upper_premolar"]
    ids_c[30:70, 80:120] = LABEL_IDS["lower_molar"]
    Image.fromarray(ids_c, mode="L").save(root / "masks" / f"{STEMS['C']}.png")
    depth16 = np.zeros((96, 128), np.uint16)
    depth16[:, 48:68] = 1000
    depth16[:, 68:88] = 32768
    depth16[:, 88:] = 65535
    Image.fromarray(depth16).save(root / "depth" / f"{STEMS['C']}.png")
    normal = np.zeros((96, 128, 3), np.uint8)
    normal[:, 48:] = (204, 128, 230)  # ≈ (0.6, 0, 0.8)
    Image.fromarray(normal).save(root / "normal" / f"{STEMS['C']}.png")
    # D: colour mask
    colour = np.zeros((64, 80, 3), np.uint8)
    colour[:, :40] = LABELS[LABEL_IDS["upper_incisor"]].color
    colour[:, 40:] = LABELS[LABEL_IDS["lower_molar"]].color
    colour[:10] = LABELS[LABEL_IDS["gingiva"]].color
    Image.fromarray(colour).save(root / "masks" / f"{STEMS['D']}.png")
    # F: 100×64 mask for a 96×64 photograph
    Image.fromarray(np.zeros((64, 100), np.uint8), mode="L").save(root / "masks" / f"{STEMS['F']}.png")
    # G: palette PNG, indices are ids, colours arbitrary
    ids_g = np.zeros((64, 64), np.uint8)
    ids_g[10:30] = LABEL_IDS["gingiva"]
    ids_g[30:50, 10:50] = LABEL_IDS["upper_molar"]
    pal = Image.fromarray(ids_g, mode="P")
    pal.putpalette([v for i in range(256) for v in (i * 7 % 256, 255 - i, 13)])
    pal.save(root / "masks" / f"{STEMS['G']}.png")
    # a depth map without photograph
    Image.fromarray(np.full((64, 96), 9, np.uint8), mode="L").save(root / "depth" / "ghost_Smith_0010.png")

    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerow([f"{STEMS['A']}.jpg", "dental photo of upper jaw, missing upper molar"])
        w.writerow([STEMS["C"], "intraoral frontal view, composite fillings"])
    info.update(ids_c=ids_c, depth16=depth16, colour=colour, ids_g=ids_g, upright_b=upright_b)
    info["ids"] = {k: photo_scan_id(p.read_bytes()) for k, p in info["files"].items()}
    return info


def _coco_labels(annotation_file: Path, image_id: int) -> np.ndarray:
    """The label map pycocotools' own COCO API gives: annToMask per annotation in file order,
    the later one painted over the earlier (the importer's documented rule), categories mapped by name."""
    coco = COCO(str(annotation_file))
    img = coco.imgs[image_id]
    out = np.zeros((img["height"], img["width"]), np.uint8)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        out[coco.annToMask(ann).astype(bool)] = LABEL_IDS[coco.cats[ann["category_id"]]["name"]]
    return out


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    base = tmp_path_factory.mktemp("clinic")
    export = base / "export"
    info = _write_export(export)
    export_bytes = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    data = base / "data"
    report = import_clinic(export, data / "incoming", data / "quarantine", ClinicConfig(resolution=RES, aspect="pad"))
    first = ingest(IngestConfig.under(data))
    # a later batch: photograph C again, re-saved with other metadata (other bytes, same pixels)
    again = base / "again"
    (again / "photos").mkdir(parents=True)
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "Referral note")
    Image.open(info["files"]["C"]).save(again / "photos" / "ana-maria_again.png", format="PNG", pnginfo=text)
    report_again = import_clinic(again, data / "incoming", data / "quarantine", ClinicConfig(resolution=RES))
    second = ingest(IngestConfig.under(data))
    # the rendered default beside the clinic's scans
    (data / "rendered").mkdir()
    for i in range(3):
        write_scan(render_scan(100 + i, scan_id=f"r-{i}").scan, data / "rendered")
    result = prepare(PrepareConfig(sources=(data / "rendered", data / "scans"), out=data / "prepared", data_root=data,
                                   workers=1, progress=False))
    return {"export": export, "info": info, "data": data, "report": report, "first": first,
            "report_again": report_again, "second": second, "prepare": result, "export_bytes": export_bytes}


def _reason(data: Path, name: str) -> dict:
    return json.loads((data / "quarantine" / name / "reason.json").read_text())


def test_import_report_and_ingestion(clinic):
    ids, report, first = clinic["info"]["ids"], clinic["report"], clinic["first"]
    accepted = {ids[k] for k in "ABCDGH"}
    assert set(report.landed) == accepted
    assert report.already_landed == [ids["A"]]  # copy_of_A.jpg: same bytes, same id
    assert report.skipped == ["photos/notes.txt"]
    assert report.unmatched_captions == 0
    assert report.maps[ids["A"]] == ["segmentation"] and report.maps[ids["H"]] == []
    assert report.maps[ids["C"]] == ["segmentation", "depth", "normal"]
    assert set(first.accepted) == accepted and not first.quarantined and not first.photos
    store = clinic["data"] / "scans"
    assert sorted(os.listdir(store / ids["C"])) == ["READY", "depth.png", "meta.json", "normal.png", "photo.png",
                                                    "segmentation.png"]
    assert sorted(os.listdir(store / ids["H"])) == ["READY", "meta.json", "photo.png"]
    assert os.listdir(clinic["data"] / "incoming") == []
    # the export was only read
    assert {p: p.read_bytes() for p in clinic["export"].rglob("*") if p.is_file()} == clinic["export_bytes"]


def test_segmentation_equals_coco_rasterisation(clinic):
    ids, store = clinic["info"]["ids"], clinic["data"] / "scans"
    for key, image_id in (("A", 1), ("B", 2)):
        full = _coco_labels(clinic["export"] / "annotations.json", image_id)
        stored = read_png(store / ids[key] / "segmentation.png", "L")
        assert np.array_equal(stored, _pad_expected(full)), key
    a_full = _coco_labels(clinic["export"] / "annotations.json", 1)
    assert a_full[20, 52] == LABEL_IDS["upper_canine"]  # overlap: the later annotation wins
    assert (a_full == LABEL_IDS["upper_incisor"]).any() and (a_full == LABEL_IDS["upper_molar"]).any()
    b_full = _coco_labels(clinic["export"] / "annotations.json", 2)
    assert (b_full == LABEL_IDS["lower_molar"]).sum() == 400  # the RLE, on the upright frame
    # 96×64 letterboxed: 64×43 at row 10, black bars above and below in the photograph
    photo = read_png(store / ids["A"] / "photo.png", "RGB")
    assert (photo[:10] == 0).all() and (photo[53:] == 0).all() and photo[10:53].mean() > 30


def test_label_pngs_index_palette_colour(clinic):
    info, ids, store = clinic["info"], clinic["info"]["ids"], clinic["data"] / "scans"
    assert np.array_equal(read_png(store / ids["C"] / "segmentation.png", "L"), _pad_expected(info["ids_c"]))
    assert np.array_equal(read_png(store / ids["G"] / "segmentation.png", "L"), info["ids_g"])  # 64×64: as it is
    lut = {lab.color: lab.id for lab in LABELS.values()}
    d_ids = np.vectorize(lambda r, g, b: lut[(r, g, b)], otypes=[np.uint8])(*np.moveaxis(info["colour"], -1, 0))
    assert np.array_equal(read_png(store / ids["D"] / "segmentation.png", "L"), _pad_expected(d_ids))


def test_depth_16bit_and_normals(clinic):
    ids, store = clinic["info"]["ids"], clinic["data"] / "scans"
    depth = read_png(store / ids["C"] / "depth.png", "L")
    # 128×96 -> 64×48 at row 8; source columns 0.. | 48.. | 68.. | 88.. become 0.. | 24.. | 34.. | 44..
    assert (depth[:8] == 0).all() and (depth[56:] == 0).all()
    rows = depth[8:56]
    assert (rows[:, :24] == 0).all()
    assert (rows[:, 24:34] == 5).all()  # 1 + (1000 - 1) * 254 / 65534 = 4.87 (not 1000 * 255 / 65535 = 3.9)
    assert (rows[:, 34:44] == 128).all()  # 1 + (32768 - 1) * 254 / 65534 = 128
    assert (rows[:, 44:] == 255).all()
    normal = read_png(store / ids["C"] / "normal.png", "RGB")
    assert (normal[:8] == (128, 128, 255)).all() and (normal[8:56, :24] == (128, 128, 255)).all()
    n = normal[8:56, 24:].astype(np.float32) / 127.5 - 1.0
    assert np.abs(np.linalg.norm(n, axis=-1) - 1).max() < 0.01 and np.abs(n - (0.6, 0.0, 0.8)).max() < 0.01


def test_no_identifier_outside_quarantine(clinic):
    data = clinic["data"]
    needles = SECRETS + [s.encode() for s in STEMS.values()] + [b"missing_Smith", b"ghost_Smith", b"copy_of_A",
                                                                  b"ana-maria_again", b"file_name", b"GPS"]
    checked = 0
    for path in data.rglob("*"):
        rel = path.relative_to(data)
        if rel.parts[0] == "quarantine":
            continue
        for needle in needles:
            assert needle.decode().lower() not in str(rel).lower(), rel
        if path.is_file():
            content = path.read_bytes().lower()
            for needle in needles:
                assert needle.lower() not in content, (rel, needle)
            checked += 1
    assert checked > 40
    # the stored photograph carries no metadata chunk; meta.json records what was done, no file name
    store = data / "scans"
    meta = json.loads((store / clinic["info"]["ids"]["A"] / "meta.json").read_text())
    assert meta["kind"] == "clinic" and meta["geometry"]["aspect"] == "pad" and meta["maps"] == ["segmentation"]
    assert meta["source"]["photo"]["sha256"] == hashlib.sha256(clinic["info"]["files"]["A"].read_bytes()).hexdigest()
    assert meta["source"]["segmentation"]["from"] == "coco" and meta["source"]["segmentation"]["annotations"] == 4


def test_refused_inputs_are_quarantined_with_file_and_rule(clinic):
    info, report, data = clinic["info"], clinic["report"], clinic["data"]
    by_rule = {v["rule"]: (sid, v) for sid, vs in report.violations.items() for v in vs}
    assert set(by_rule) == {"coco_category_mapped", "map_size", "coco_image_present", "map_without_photo"}
    sid, v = by_rule["coco_category_mapped"]
    assert sid == info["ids"]["E"] and v["file"] == "annotations.json" and "tooth_11" in v["detail"]
    sid, v = by_rule["map_size"]
    assert sid == info["ids"]["F"] and v["file"] == f"masks/{STEMS['F']}.png" and "100×64" in v["detail"]
    assert by_rule["coco_image_present"][1]["file"] == "annotations.json"
    assert "missing_Smith_0009.jpg" in by_rule["coco_image_present"][1]["detail"]
    assert by_rule["map_without_photo"][1]["file"] == "depth/ghost_Smith_0010.png"
    # nothing lost: the originals, byte for byte, in the export's layout, beside reason.json
    for key, extra in (("E", "annotations.json"), ("F", f"masks/{STEMS['F']}.png")):
        folder = data / "quarantine" / report.quarantined[info["ids"][key]]
        name = info["files"][key].name
        assert (folder / "photos" / name).read_bytes() == info["files"][key].read_bytes()
        assert (folder / extra).is_file()
        reason = _reason(data, report.quarantined[info["ids"][key]])
        assert reason["scan_id"] == info["ids"][key] and reason["source"] == "import-clinic"
        assert reason["violations"] == report.violations[info["ids"][key]]
    e_coco = json.loads((data / "quarantine" / report.quarantined[info["ids"]["E"]] / "annotations.json").read_text())
    assert [a["id"] for a in e_coco["annotations"]] == [50] and e_coco["images"][0]["id"] == 5
    ghost = data / "quarantine" / report.quarantined[by_rule["map_without_photo"][0]] / "depth" / "ghost_Smith_0010.png"
    assert ghost.read_bytes() == (clinic["export"] / "depth" / "ghost_Smith_0010.png").read_bytes()
    # none of them reached the landing folder or the store
    assert not {info["ids"]["E"], info["ids"]["F"]} & set(os.listdir(data / "scans"))


def test_duplicate_caught_by_ingestion(clinic):
    again, second, ids = clinic["report_again"], clinic["second"], clinic["info"]["ids"]
    assert len(again.landed) == 1 and again.landed[0] != ids["C"]  # other bytes, other id
    sid = again.landed[0]
    assert second.quarantined == {sid: sid} and not second.accepted
    (v,) = second.violations[sid]
    assert (v["file"], v["rule"]) == ("photo.png", "unique_content") and ids["C"] in v["detail"]


def test_prepare_pairs_per_condition_and_captions(clinic):
    prepared, ids = clinic["data"] / "prepared", clinic["info"]["ids"]
    rendered = {"r-0", "r-1", "r-2"}

    def scans(condition):
        return {r["scan_id"] for r in read_pairs(prepared, condition)}

    clinic_ids = {ids[k] for k in "ABCDGH"}
    assert scans("segmentation") == rendered | {ids[k] for k in "ABCDG"}
    assert scans("depth") == scans("normal") == rendered | {ids["C"]}
    assert scans("lighting") == rendered
    for c in ("canny", "grayscale", "blur", "palette"):
        assert scans(c) == rendered | clinic_ids
    captions = {r["scan_id"]: r["caption"] for r in read_pairs(prepared, "canny")}
    assert captions[ids["A"]] == "dental photo of upper jaw, missing upper molar"
    assert captions[ids["C"]] == "intraoral frontal view, composite fillings"
    assert captions[ids["B"]] == captions[ids["H"]] == PHOTO_CAPTION
    meta = json.loads((clinic["data"] / "rendered" / "r-0" / "meta.json").read_text())
    assert captions["r-0"] == caption_from_meta(meta)
    # the prepared segmentation of a clinic scan is its stored map in the label colours
    seg = read_png(clinic["data"] / "scans" / ids["A"] / "segmentation.png", "L")
    lut = np.array([LABELS[i].color if i in LABELS else (255, 0, 255) for i in range(256)], np.uint8)
    assert np.array_equal(read_png(prepared / "conditions" / "segmentation" / f"{ids['A']}.png", "RGB"), lut[seg])


def test_pad_versus_crop(clinic, tmp_path):
    ids = clinic["info"]["ids"]
    incoming = tmp_path / "incoming"
    report = import_clinic(clinic["export"], incoming, tmp_path / "quarantine", ClinicConfig(resolution=RES, aspect="crop"))
    assert ids["A"] in report.landed
    full = _coco_labels(clinic["export"] / "annotations.json", 1)
    crop = read_png(incoming / ids["A"] / "segmentation.png", "L")
    assert np.array_equal(crop, full[:, 16:80])  # 96×64: the centred 64×64 square, no resize
    pad = read_png(clinic["data"] / "scans" / ids["A"] / "segmentation.png", "L")
    molar = LABEL_IDS["upper_molar"]
    assert (pad == molar).any() and not (crop == molar).any()  # the crop cuts the posterior tooth
    photo = read_png(incoming / ids["A"] / "photo.png", "RGB")
    assert photo[:10].mean() > 30 and photo[54:].mean() > 30  # no letterbox bars
    assert json.loads((incoming / ids["A"] / "meta.json").read_text())["geometry"]["box"] == [16, 0, 80, 64]
    # H (90×70, shorter side 70 >= 64): cropped, not padded; its pixels differ from the padded import
    assert not np.array_equal(read_png(incoming / ids["H"] / "photo.png", "RGB"),
                              read_png(clinic["data"] / "scans" / ids["H"] / "photo.png", "RGB"))


def test_category_mapping_from_params():
    with pytest.raises(ClinicExportError, match="FDI"):
        ClinicConfig(categories={"tooth_11": "fdi_11"})
    with pytest.raises(ClinicExportError, match="aspect"):
        ClinicConfig(aspect="stretch")
    with pytest.raises(ClinicExportError, match="unknown keys"):
        ClinicConfig.from_params({"aspects": "pad"}, RES)
    cfg = ClinicConfig.from_params({"aspect": "crop", "categories": {"tooth": "upper_incisor", "gum": "gingiva"}}, 32)
    assert (cfg.resolution, cfg.aspect, cfg.category_ids) == (32, "crop", {"tooth": 2, "gum": 1})
    # the default mapping (params.yaml's) covers every label by name
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    assert params["clinic"]["categories"] == {lab.name: lab.name for lab in LABELS.values()}
    assert params["clinic"]["aspect"] == "pad"


def test_mapped_category_lands(tmp_path):
    """A category renamed through the mapping lands under its label; a mapping without it refuses."""
    export = tmp_path / "export"
    (export / "photos").mkdir(parents=True)
    Image.fromarray(_texture(64, 64, 11)).save(export / "photos" / "x.png")
    ann = {"id": 1, "image_id": 7, "category_id": 3, "segmentation": _rect(5, 5, 20, 20)}
    (export / "annotations.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "x.png", "width": 64, "height": 64}], "annotations": [ann],
        "categories": [{"id": 3, "name": "Zahn"}]}))
    sid = photo_scan_id((export / "photos" / "x.png").read_bytes())
    ok = import_clinic(export, tmp_path / "in1", tmp_path / "q1", ClinicConfig(categories={"Zahn": "lower_canine"}))
    assert ok.landed == [sid]
    seg = read_png(tmp_path / "in1" / sid / "segmentation.png", "L")
    assert set(np.unique(seg).tolist()) == {0, LABEL_IDS["lower_canine"]}
    refused = import_clinic(export, tmp_path / "in2", tmp_path / "q2", ClinicConfig())
    assert refused.landed == [] and refused.violations[sid][0]["rule"] == "coco_category_mapped"
    assert not (tmp_path / "in2" / sid).exists() and (tmp_path / "q2" / sid / "reason.json").is_file()


def test_cli(tmp_path, capsys):
    export = tmp_path / "export"
    (export / "photos").mkdir(parents=True)
    Image.fromarray(_texture(48, 72, 12)).save(export / "photos" / "Patient Name.jpg", format="JPEG", exif=identifying_exif(1))
    params = tmp_path / "params.yaml"
    params.write_text("prepare: {resolution: 32}\nclinic: {aspect: crop}\n")
    out = tmp_path / "data" / "incoming"
    assert cli_main(["import-clinic", str(export), "--out", str(out), "--params", str(params)]) == 0
    report = json.loads(capsys.readouterr().out)
    (sid,) = report["landed"]
    meta = json.loads((out / sid / "meta.json").read_text())
    assert (meta["resolution"], meta["geometry"]["aspect"], meta["caption"]) == (32, "crop", PHOTO_CAPTION)
    assert read_png(out / sid / "photo.png", "RGB").shape == (32, 32, 3)
    # a broken annotations.json: one error line, exit 2, nothing written
    (export / "annotations.json").write_text("{not json")
    out2 = tmp_path / "data2" / "incoming"
    assert cli_main(["import-clinic", str(export), "--out", str(out2), "--params", str(params)]) == 2
    assert "annotations.json: not a JSON file" in capsys.readouterr().err
    assert not out2.exists()


def _clinic_folder(root: Path, sid: str, maps: dict[str, np.ndarray], declared: list[str], photo_seed: int) -> Path:
    folder = root / sid
    folder.mkdir(parents=True)
    (folder / "photo.png").write_bytes(png_bytes(_texture(RES, RES, photo_seed), "RGB"))
    for name, arr in maps.items():
        (folder / f"{name}.png").write_bytes(png_bytes(arr, "RGB" if name == "normal" else "L"))
    meta = {"scan_id": sid, "kind": "clinic", "resolution": RES, "caption": "dental photo", "maps": declared}
    (folder / "meta.json").write_bytes(meta_bytes(meta))
    (folder / "READY").write_bytes(b"")
    return folder


def test_contract_of_clinic_scans(tmp_path):
    """Ingestion validates a clinic scan: declared maps present, no undeclared file, known label ids,
    unit normals, values within the layout's mode; depth may disagree with the mask's outline."""
    data = tmp_path / "data"
    inc = data / "incoming"
    seg = np.zeros((RES, RES), np.uint8)
    seg[10:20] = LABEL_IDS["upper_molar"]
    depth = np.zeros((RES, RES), np.uint8)
    depth[5:40] = 200  # covers background rows of the mask too: allowed for a clinic scan
    bad_seg = seg.copy()
    bad_seg[0, 0] = 42
    bad_normal = np.zeros((RES, RES, 3), np.uint8)
    _clinic_folder(inc, "good", {"segmentation": seg, "depth": depth}, ["segmentation", "depth"], 1)
    _clinic_folder(inc, "undeclared", {"segmentation": seg, "depth": depth}, ["segmentation"], 2)
    _clinic_folder(inc, "missing", {"segmentation": seg}, ["segmentation", "normal"], 3)
    _clinic_folder(inc, "badlabel", {"segmentation": bad_seg}, ["segmentation"], 4)
    _clinic_folder(inc, "badnormal", {"normal": bad_normal}, ["normal"], 5)
    _clinic_folder(inc, "badmaps", {}, ["segmentation", "lighting"], 6)
    report = ingest(IngestConfig.under(data))
    assert report.accepted == ["good"]
    rules = {sid: {(v["file"], v["rule"]) for v in vs} for sid, vs in report.violations.items()}
    assert ("depth.png", "known_file") in rules["undeclared"]
    assert ("normal.png", "required_file_present") in rules["missing"]
    assert ("segmentation.png", "segmentation_labels") in rules["badlabel"]
    assert ("normal.png", "normal_unit_length") in rules["badnormal"]
    assert ("meta.json", "meta_schema") in rules["badmaps"]
    result = prepare(PrepareConfig(sources=(data / "scans",), out=data / "prepared", data_root=data, workers=1,
                                   progress=False))
    assert result.scans == 1
    assert {r["scan_id"] for r in read_pairs(data / "prepared", "depth")} == {"good"}
    assert read_pairs(data / "prepared", "normal") == []


def test_label_map_palette_by_colour_and_refusals(tmp_path):
    """A palette PNG painted with the label colours is read by colour, whatever its indices; an
    unknown colour or id refuses the map with segmentation_labels."""
    from ctrlora.data.clinic import Refused, read_label_map

    want = np.zeros((8, 8), np.uint8)
    want[2:6] = LABEL_IDS["upper_canine"]
    want[6:] = LABEL_IDS["lower_premolar"]
    order = [LABEL_IDS["lower_premolar"], LABEL_IDS["upper_canine"], 0]  # index i holds the colour of label order[i]
    index = np.vectorize(order.index, otypes=[np.uint8])(want)
    im = Image.fromarray(index, mode="P")
    im.putpalette([v for i in order for v in LABELS[i].color])
    im.save(tmp_path / "p.png")
    assert np.array_equal(read_label_map(tmp_path / "p.png", "masks/p.png", (8, 8)), want)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(Refused) as info:
        read_label_map(tmp_path / "rgb.png", "masks/rgb.png", (8, 8))
    assert info.value.violation.rule == "segmentation_labels" and "(1, 2, 3)" in info.value.violation.detail
    Image.fromarray(np.full((8, 8), 42, np.uint8), mode="L").save(tmp_path / "ids.png")
    with pytest.raises(Refused, match="segmentation_labels"):
        read_label_map(tmp_path / "ids.png", "masks/ids.png", (8, 8))
    with pytest.raises(Refused, match="map_size"):
        read_label_map(tmp_path / "ids.png", "masks/ids.png", (8, 9))


def test_category_mapped_to_background_is_ignored(tmp_path):
    """A finding annotated on a tooth, its category mapped to background, is not painted: the
    tooth under it stays (painting background would erase it)."""
    export = tmp_path / "export"
    (export / "photos").mkdir(parents=True)
    Image.fromarray(_texture(64, 64, 13)).save(export / "photos" / "x.png")
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": _rect(10, 10, 40, 40)},
            {"id": 2, "image_id": 7, "category_id": 2, "segmentation": _rect(20, 20, 30, 30)}]
    (export / "annotations.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "x.png", "width": 64, "height": 64}], "annotations": anns,
        "categories": [{"id": 1, "name": "Molar"}, {"id": 2, "name": "Caries"}]}))
    sid = photo_scan_id((export / "photos" / "x.png").read_bytes())
    cfg = ClinicConfig(categories={"Molar": "upper_molar", "Caries": "background"})
    assert import_clinic(export, tmp_path / "in", tmp_path / "q", cfg).landed == [sid]
    seg = read_png(tmp_path / "in" / sid / "segmentation.png", "L")
    assert (seg[10:40, 10:40] == LABEL_IDS["upper_molar"]).all() and seg.sum() == 30 * 30 * LABEL_IDS["upper_molar"]
