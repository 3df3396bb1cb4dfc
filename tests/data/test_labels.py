"""The segmentation label table declared in params.yaml ``labels``: the default is the built-in
10-label table (prepared images bit-identical), a table is validated rule by rule, and a table
numbering teeth (FDI 11..48) lands a clinic's COCO export with those ids, while the renderer,
which draws only the default's tooth types, refuses it by name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ctrlora.cli import main as cli_main
from ctrlora.data import labels as L
from ctrlora.data.clinic import ClinicConfig, ClinicExportError, import_clinic
from ctrlora.data.files import read_png
from ctrlora.data.photos import photo_scan_id

# pycocotools' own decode, used here as the reference, trips numpy 2's __array__(copy=...) deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]
FDI_TEETH = [10 * q + t for q in (1, 2, 3, 4) for t in range(1, 9)]  # 11..18, 21..28, 31..38, 41..48


def _fdi_entries() -> list[dict]:
    """background, gingiva and the 32 FDI teeth, each tooth with its own colour."""
    teeth = [{"id": n, "name": f"tooth_{n}", "colour": [60 * (n // 10), 28 * (n % 10), 255 - 50 * (n // 10)]}
             for n in FDI_TEETH]
    return [{"id": 0, "name": "background", "colour": [0, 0, 0]},
            {"id": 1, "name": "gingiva", "colour": [200, 40, 60]}, *teeth]


def _fdi_params(tmp_path: Path) -> Path:
    """The project's params with the FDI table and a category per tooth number (the COCO export's
    names; written as YAML integers, as a clinic would type them)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["labels"] = _fdi_entries()
    params["clinic"]["categories"] = {"gingiva": "gingiva", **{n: f"tooth_{n}" for n in FDI_TEETH}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_params_declares_the_default_table():
    """params.yaml's table is exactly the built-in default: ids, names and colours (the colours are
    the segmentation condition's encoding, pinned by test_prepare_pinned)."""
    declared = yaml.safe_load((REPO / "params.yaml").read_text())["labels"]
    assert L.LabelTable.from_entries(declared) == L.DEFAULT_TABLE
    assert [lab.name for lab in L.DEFAULT_LABELS] == list(L.RENDER_LABELS)
    table = L.label_table(refresh=True)
    assert table == L.DEFAULT_TABLE and table.num_classes == 10 and L.num_classes() == 10
    assert (L.BACKGROUND, L.GINGIVA, L.tooth_label("upper", "canine")) == (0, 1, 3)
    assert L.TOOTH_LABEL_IDS == frozenset(range(2, 10))
    assert L.LABEL_IDS["lower_molar"] == 9 and L.LABELS[9].color == (140, 40, 200)
    lut = L.color_lut()
    assert lut.shape == (256, 3) and tuple(lut[2]) == (255, 255, 110) and tuple(lut[200]) == L.UNKNOWN_COLOUR


def test_a_params_file_without_labels_gives_the_default(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text("prepare: {resolution: 32}\n")
    monkeypatch.setenv("CTRLORA_PARAMS", str(path))
    assert L.label_table(refresh=True) == L.DEFAULT_TABLE
    monkeypatch.setenv("CTRLORA_PARAMS", str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError):
        L.label_table(refresh=True)


def _with(change):
    entries = _fdi_entries()
    change(entries)
    return entries


@pytest.mark.parametrize("entries, rule", [
    ([], "label_list"),
    ({"id": 0}, "label_list"),
    (_with(lambda e: e[2].update(extra=1)), "label_list"),
    (_with(lambda e: e[2].pop("colour")), "label_list"),
    (_with(lambda e: e[2].update(id=256)), "label_id"),
    (_with(lambda e: e[2].update(id=-1)), "label_id"),
    (_with(lambda e: e[2].update(id="11")), "label_id"),
    (_with(lambda e: e[2].update(id=True)), "label_id"),
    (_with(lambda e: e[2].update(name=11)), "label_name"),
    (_with(lambda e: e[2].update(name="tooth 11")), "label_name"),
    (_with(lambda e: e[2].update(colour=[1, 2])), "label_colour"),
    (_with(lambda e: e[2].update(colour=[1, 2, 300])), "label_colour"),
    (_with(lambda e: e[2].update(colour="red")), "label_colour"),
    (_with(lambda e: e[2].update(colour=[255, 0, 255])), "label_colour"),
    (_with(lambda e: e[3].update(id=11)), "unique_label_id"),
    (_with(lambda e: e[3].update(name="tooth_11")), "unique_label_name"),
    (_with(lambda e: e[3].update(colour=e[2]["colour"])), "unique_label_colour"),
    (_with(lambda e: e.pop(0)), "background_label"),
    (_with(lambda e: e[0].update(name="void")), "background_label"),
])
def test_validation_names_the_rule(entries, rule):
    with pytest.raises(ValueError, match=rule) as err:
        L.LabelTable.from_entries(entries)
    assert err.value.rule == rule and "params labels" in str(err.value)


def test_fdi_table_from_params(tmp_path, monkeypatch):
    """The FDI table read through $CTRLORA_PARAMS: ids 0, 1, 11..48; a segmenter has 49 classes
    (max id + 1), so a stored id is its class index; colours encode the condition."""
    monkeypatch.setenv("CTRLORA_PARAMS", str(_fdi_params(tmp_path)))
    table = L.label_table(refresh=True)
    assert table.ids == (0, 1, *FDI_TEETH) and table.num_classes == 49 == L.num_classes()
    assert table.tooth_ids == frozenset(FDI_TEETH) and L.label_id("tooth_36") == 36
    assert tuple(L.color_lut()[36]) == (180, 168, 105) and tuple(L.color_lut()[20]) == L.UNKNOWN_COLOUR
    from ctrlora.evaluation.fidelity import default_detector_config

    assert default_detector_config("segmentation").channels == 49
    # the renderer draws tooth types by jaw: this table cannot render, and says which labels it lacks
    from ctrlora.data.render import render_scan

    with pytest.raises(ValueError, match="renderer.*upper_incisor, upper_canine.*lower_molar"):
        render_scan(0)
    with pytest.raises(ValueError, match="no label for jaw='upper' tooth type='canine'"):
        L.tooth_label("upper", "canine")
    # a category mapped onto a name the table lacks is refused at configuration
    with pytest.raises(ClinicExportError, match="upper_molar"):
        ClinicConfig(categories={"Molar": "upper_molar"})


def test_default_render_keeps_its_ten_classes():
    from ctrlora.data.render import render_scan

    assert L.label_table(refresh=True) == L.DEFAULT_TABLE
    seg = render_scan(3, scan_id="r-0").scan.segmentation
    assert set(np.unique(seg).tolist()) <= set(range(10)) and {0, 1} < set(np.unique(seg).tolist())


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_fdi_coco_export_lands_with_fdi_ids(tmp_path, monkeypatch):
    """A clinic's COCO export whose categories are FDI numbers, imported through the CLI with the
    FDI params: the stored label maps are pycocotools' rasterisation with the FDI ids, and the
    ingestion's contract accepts them under the same table."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    params = _fdi_params(tmp_path)
    export = tmp_path / "export"
    (export / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["Patient_A_0001.png", "Patient_B_0002.png"]
    for name in names:  # 64×64 at resolution 64: no resampling, the map is the rasterisation itself
        Image.fromarray(rng.integers(30, 220, (64, 64, 3), dtype=np.uint8)).save(export / "photos" / name)
    categories = [{"id": 100 + n, "name": str(n)} for n in FDI_TEETH] + [{"id": 7, "name": "gingiva"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": _rect(0, 0, 64, 14)},
        {"id": 2, "image_id": 1, "category_id": 111, "segmentation": _rect(24, 10, 32, 34)},
        {"id": 3, "image_id": 1, "category_id": 121, "segmentation": _rect(32, 10, 40, 34)},
        {"id": 4, "image_id": 1, "category_id": 118, "segmentation": [[2, 12, 12, 12, 12, 30, 7, 34, 2, 30]]},
        {"id": 5, "image_id": 2, "category_id": 136, "segmentation": _rect(8, 36, 22, 54)},
        {"id": 6, "image_id": 2, "category_id": 148, "segmentation": _rect(44, 36, 60, 54)},
        {"id": 7, "image_id": 2, "category_id": 141, "segmentation": _rect(28, 36, 36, 56)},
        {"id": 8, "image_id": 2, "category_id": 131, "segmentation": _rect(33, 38, 40, 56)},  # over 41: wins
    ]
    images = [{"id": i + 1, "file_name": name, "width": 64, "height": 64} for i, name in enumerate(names)]
    coco_file = export / "annotations.json"
    coco_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))

    data = tmp_path / "data"
    assert cli_main(["import-clinic", str(export), "--out", str(data / "incoming"), "--params", str(params)]) == 0
    coco = COCO(str(coco_file))
    ids = {"gingiva": 1, **{str(n): n for n in FDI_TEETH}}  # COCO category name -> FDI label id
    for image_id, name in enumerate(names, start=1):
        want = np.zeros((64, 64), np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            want[coco.annToMask(ann).astype(bool)] = ids[coco.cats[ann["category_id"]]["name"]]
        sid = photo_scan_id((export / "photos" / name).read_bytes())
        got = read_png(data / "incoming" / sid / "segmentation.png", "L")
        assert np.array_equal(got, want)
        assert set(np.unique(got).tolist()) - {0, 1} <= set(FDI_TEETH)
    assert {36, 48, 31} <= set(np.unique(got).tolist())  # the second photograph's teeth, 31 over 41

    # the ingestion validates the landed ids against the project's table: the FDI one here
    from ctrlora.data.ingest import IngestConfig, ingest

    monkeypatch.setenv("CTRLORA_PARAMS", str(params))
    L.label_table(refresh=True)
    report = ingest(IngestConfig.under(data))
    assert sorted(report.accepted) == sorted(photo_scan_id((export / "photos" / n).read_bytes()) for n in names)

    # without the FDI table the same export is refused: its categories are no labels of the default
    refused = import_clinic(export, tmp_path / "in2", tmp_path / "q2", ClinicConfig(labels=L.DEFAULT_TABLE))
    assert refused.landed == [] and {v[0]["rule"] for v in refused.violations.values()} == {"coco_category_mapped"}
