"""The condition table of params.yaml ``conditions``: what it accepts, what it refuses (naming the
condition and the key), and that the params file decides what ``CONDITIONS`` and the evaluation's
views hold."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ctrlora.data.conditions import CONDITIONS, ConditionTable, condition_table, gaussian_blur
from ctrlora.data.render import render_scan
from ctrlora.data.scan import Scan

REPO = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())["conditions"]


def test_the_repo_table_is_the_default_registry():
    table = condition_table()
    assert list(table) == list(DEFAULT) == list(CONDITIONS)
    assert table.names(kind="derived") == ("canny", "grayscale", "blur", "palette")
    assert table.clinic_maps == ("segmentation", "depth", "normal")  # meta.json's order of clinic maps
    assert table["blur"].op_params == {"sigma": 2.0} and table["palette"].op_params == {"colors": 8}


def test_a_new_derived_condition_encodes_with_its_own_parameters():
    table = ConditionTable({**DEFAULT, "blur_strong": {"kind": "derived", "op": "blur", "sigma": 4,
                                                      "metric": "ssim", "detector": "none"}})
    photo = render_scan(3).scan.photo
    out = table["blur_strong"].encode(Scan(scan_id="t", photo=photo))
    assert np.array_equal(out, np.clip(gaussian_blur(photo.astype(np.float32) / 255.0, sigma=4.0), 0, 1))
    assert not np.array_equal(out, table["blur"].encode(Scan(scan_id="t", photo=photo)))
    gen = out[None]
    assert np.allclose(table["blur_strong"].extractor()(gen), np.clip(gaussian_blur(out, 4.0), 0, 1)[None])
    assert table["blur_strong"].source == "derived" and "sigma 4.0" in table["blur_strong"].description


BLUR = {"kind": "derived", "op": "blur", "sigma": 3.0, "metric": "ssim", "detector": "none"}


@pytest.mark.parametrize("entry, message", [
    ({**BLUR, "sigmaa": 1.0}, r"condition 'x': unknown key 'sigmaa' for kind derived op blur"),
    ({**BLUR, "kind": "sketch"}, r"condition 'x': key 'kind' must be one of"),
    ({**BLUR, "op": "sharpen"}, r"condition 'x': key 'op' must be one of"),
    ({k: v for k, v in BLUR.items() if k != "sigma"}, r"condition 'x': op blur needs key 'sigma'"),
    ({**BLUR, "sigma": "wide"}, r"condition 'x': sigma must be a number"),
    ({**BLUR, "metric": "miou"}, r"condition 'x': key 'metric' must be ssim for kind derived op blur"),
    ({**BLUR, "detector": "regression"}, r"condition 'x': key 'detector' must be none for kind derived"),
    ({k: v for k, v in BLUR.items() if k != "metric"}, r"condition 'x': key 'metric' is missing"),
    ({**BLUR, "channels": 1}, r"condition 'x': unknown key 'channels'"),
    ({"kind": "continuous", "channels": 1, "metric": "ssim", "detector": "regression"},
     r"condition 'x': kind continuous reads the scan map x.png"),
    ("blur", r"condition 'x': expected a mapping"),
])
def test_a_bad_entry_is_refused_naming_condition_and_key(entry, message):
    with pytest.raises(ValueError, match=message):
        ConditionTable({"x": entry})


def test_map_entries_must_match_the_scan_maps():
    with pytest.raises(ValueError, match=r"condition 'normal': key 'channels' must be 3"):
        ConditionTable({"normal": {**DEFAULT["normal"], "channels": 1}})
    with pytest.raises(ValueError, match=r"condition 'depth': key 'kind' is label_map"):
        ConditionTable({"depth": {"kind": "label_map", "metric": "miou", "detector": "segmentation"}})
    with pytest.raises(ValueError, match=r"same clinic folder"):
        ConditionTable({"depth": DEFAULT["depth"], "normal": {**DEFAULT["normal"], "clinic": "depth"}})
    with pytest.raises(ValueError, match=r"condition name 'Blur Strong'"):
        ConditionTable({"Blur Strong": BLUR})
    with pytest.raises(ValueError, match=r"non-empty mapping"):
        ConditionTable({})


def test_the_params_file_named_by_the_environment_decides_the_table(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["conditions"]["blur_strong"] = BLUR
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    script = ("from ctrlora.data.conditions import CONDITIONS\n"
              "from ctrlora.evaluation.fidelity import PRIMARY_METRIC, DETECTED_CONDITIONS\n"
              "from ctrlora.evaluation.scoring import derived_extractor\n"
              "print(list(CONDITIONS)[-1], PRIMARY_METRIC['blur_strong'], 'blur_strong' in DETECTED_CONDITIONS,\n"
              "      derived_extractor('blur_strong') is not None)\n")
    env = dict(os.environ, CTRLORA_PARAMS=str(tmp_path / "params.yaml"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["blur_strong", "ssim", "False", "True"]
    assert "blur_strong" not in CONDITIONS  # this process still reads the repo's table


def test_a_params_file_without_the_section_falls_back_to_the_checkout(tmp_path, monkeypatch):
    (tmp_path / "partial.yaml").write_text("train_base: {conditions: [canny]}\n")
    monkeypatch.setenv("CTRLORA_PARAMS", str(tmp_path / "partial.yaml"))
    assert list(CONDITIONS) == list(DEFAULT)
    bad = dict(DEFAULT, blur={**DEFAULT["blur"], "sigma": -1})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"conditions": bad}, sort_keys=False))
    monkeypatch.setenv("CTRLORA_PARAMS", str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match=r"condition 'blur': sigma must be a number in \(0, 64\]"):
        list(CONDITIONS)
