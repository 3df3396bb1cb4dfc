"""The README's result tables come from the committed metrics files, and stay in step with them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.orchestration import report

REPO = Path(__file__).resolve().parents[2]


def _iv(v, lo, hi):
    return {"value": v, "low": lo, "high": hi, "n": 10, "level": 0.95}


def _check(v, lo, hi, thr, ok):
    return {"value": v, "low": lo, "high": hi, "threshold": thr, "n_scans": 10, "seeds": 1, "level": 0.95, "pass": ok}


def _write(root: Path) -> None:
    (root / "metrics").mkdir(parents=True)
    backbone = root / report.FILES["backbone"]  # the foundation's metrics file
    backbone.parent.mkdir(parents=True, exist_ok=True)
    backbone.write_text(json.dumps({
        "vae": {"photo_psnr": 24.5, "photo_ssim": 0.85, "segmentation_psnr": 15.0},
        "samples": {"n": 128, "steps": 20, "guidance_scale": 3.0, "pixfd8": 2.5, "pixfd16": 15.7,
                    "pixfd8_real_floor": 1.7, "pixfd16_real_floor": 11.6}, "split": "validation"}))
    (root / "metrics" / "evaluate.json").write_text(json.dumps({
        "segmentation": {"metric": "miou", "uncontrolled": 0.13, "fidelity": 0.41, "gain": _iv(0.28, 0.25, 0.31)},
        "combined": {"weights": {"segmentation": 1.0},
                     "segmentation": {"single_gain": 0.28, "gain": _iv(0.27, 0.24, 0.3), "ratio": _iv(0.96, 0.91, 1.01)}},
        "quality_bar": {"guidance": 1.0, "passed": 2, "total": 3, "checks": {
            "controlled_vs_uncontrolled/segmentation": _check(0.28, 0.25, 0.31, 0.2, True),
            "combined_vs_single/segmentation": _check(0.96, 0.91, 1.01, 0.9, True),
            "adapter_param_fraction/lighting": _check(0.2, None, None, 0.15, False)}},
        "protocol": {"n_scans": 10, "conditions": ["segmentation"], "train_seeds": 1}}))
    (root / "README.md").write_text("# title\n\nbefore\n\n" + report.BEGIN + "\nstale\n" + report.END + "\n\nafter\n")


def test_tables_are_written_between_the_markers_from_the_files(tmp_path):
    _write(tmp_path)
    assert report.update_readme(tmp_path, check=True)  # stale block: would change
    assert report.update_readme(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert "| segmentation | miou | 0.130 | 0.410 | +0.280 [+0.250, +0.310] | ≥ 0.2 | **pass** |" in text
    assert "0.960 [0.910, 1.010]" in text  # the combined ratio with its interval
    assert "| ≤ 0.15 | 0.200 fail |" in text
    assert "**2 of 3 checks pass**" in text
    assert "| posterior mean | 24.50 / 0.850 | segmentation 15.0 |" in text
    assert not report.update_readme(tmp_path)  # idempotent


def test_missing_markers_are_a_clear_error(tmp_path):
    (tmp_path / "README.md").write_text("# no block\n")
    with pytest.raises(ValueError, match="results:begin"):
        report.update_readme(tmp_path)


def test_the_committed_readme_matches_the_committed_metrics():
    assert not report.update_readme(REPO, check=True), "run `python -m pipelines.orchestration.report` (make report)"


def test_other_guidance_table_has_the_bars_the_count_and_why_checks_fail(tmp_path):
    _write(tmp_path)
    ev_file = tmp_path / "metrics" / "evaluate.json"
    ev = json.loads(ev_file.read_text())
    # at 7.5 on 4 scans: segmentation's estimate clears its 0.2 bar but the interval's lower end does
    # not; the combined ratio's estimate itself is short of 0.9; the size check passes
    ev["at_guidance"] = {"7.5": {
        "guidance": 7.5, "n_scans": 4,
        "conditions": {"segmentation": {"metric": "miou", "uncontrolled": 0.1, "fidelity": 0.35,
                                        "gain": _iv(0.25, 0.15, 0.35)}},
        "combined": {"weights": {"segmentation": 1.0},
                     "segmentation": {"single_gain": 0.25, "gain": _iv(0.2, 0.1, 0.3), "ratio": _iv(0.8, 0.5, 1.1)}},
        "quality_bar": {"guidance": 7.5, "gates": False, "passed": 1, "total": 3, "checks": {
            "controlled_vs_uncontrolled/segmentation": _check(0.25, 0.15, 0.35, 0.2, False),
            "combined_vs_single/segmentation": _check(0.8, 0.5, 1.1, 0.9, False),
            "adapter_param_fraction/lighting": _check(0.1, 0.1, 0.1, 0.15, True)}}}}
    ev_file.write_text(json.dumps(ev))
    text = report.render(tmp_path)
    block = text.split("At guidance 7.5", 1)[1]
    assert "| segmentation | miou | 0.100 | 0.350 | +0.250 [+0.150, +0.350] | ≥ 0.2 | fail |" in block
    assert "| segmentation | +0.250 | +0.200 [+0.100, +0.300] | 0.800 [0.500, 1.100] | ≥ 0.9 | fail |" in block
    assert "| ≤ 0.15 | 0.100 **pass** |" in block
    assert "[95 %, 4 scans]" in block and "first 4 test scans" in block
    assert "**1 of 3 checks pass** over 4 scans (at the gating guidance 1.0: 2 of 3 over 10)" in block
    assert "1 with the estimate itself short of the bar (`combined_vs_single/segmentation`)" in block
    assert "(`controlled_vs_uncontrolled/segmentation`: undecided" in block


def test_research_note_quotes_the_simulated_rate_for_the_runs_seed_count():
    calib = {"nominal_rate": 0.025, "results": [{"seeds": 3, "false_positive_rate": 0.02,
                                                 "mc_interval": [0.0109, 0.0364],
                                                 "uncorrected_false_positive_rate": 0.082,
                                                 "uncorrected_mc_interval": [0.061, 0.1094]}]}
    note = report.calibration_note(calib, 3)
    assert "with 3 seeds a method" in note and "2.0 % of the time [1.1 %, 3.6 %]" in note
    # the corrected rate covers the nominal one: said so, with the uncorrected rate as the before
    assert "consistent with the nominal 2.5 %" in note and "at about the nominal level" in note
    assert "without the correction it was 8.2 % [6.1 %, 10.9 %]" in note and "not proof" not in note
    # a seed count the simulation did not cover is said to be unmeasured, not given another count's rate
    assert "not measured" in report.calibration_note(calib, 4) and "2.0" not in report.calibration_note(calib, 4)
    assert "not measured" in report.calibration_note(None, 3)


def test_research_note_above_nominal_or_from_before_the_correction():
    # a results file from before the correction: its only rate is the plain bootstrap's, above nominal
    old = {"nominal_rate": 0.025, "results": [{"seeds": 3, "false_positive_rate": 0.088,
                                               "mc_interval": [0.066, 0.116]}]}
    note = report.calibration_note(old, 3)
    assert "8.8 % of the time [6.6 %, 11.6 %], above the nominal 2.5 %" in note
    assert "before the small-seed correction" in note and "not proof at the nominal level" in note
    low = {"nominal_rate": 0.025, "results": [{"seeds": 5, "false_positive_rate": 0.004,
                                               "mc_interval": [0.001, 0.012]}]}
    assert "below the nominal 2.5 %" in report.calibration_note(low, 5)


def test_utility_and_efficiency_tables_on_known_numbers():
    u = {"test_scans": 20, "seeds": 3, "family_level": 0.9875, "n": {
        "25": {"real": {"m": 0, "miou": _iv(0.5, 0.45, 0.55)},
               "real_gen": {"m": 200, "miou": _iv(0.6, 0.55, 0.65), "gain": _iv(0.1, 0.05, 0.15)}},
        "400": {"real": {"m": 0, "miou": _iv(0.8, 0.75, 0.85)}}},
        "headline": {"n": 25, "gain": _iv(0.1, 0.05, 0.15), "vs_real_gen_uncontrolled": _iv(0.2, 0.1, 0.3),
                     "worth": {"worth": 40.0, "low": 12.0, "high": "above_curve", "above": False, "below": False},
                     "checks": {"gain_above_zero": True, "above_uncontrolled_control": False}}}
    audit = {"train_photos": 100, "percentile": 1.0, "pixel": {"controlled": {
        "generated_below": 3, "n_generated": 40, "generated_share": _iv(0.075, 0.02, 0.15), "test_share": 0.01,
        "median_ratio": 0.9, "source": {"nearest_is_source": _iv(0.25, 0.1, 0.4)}}}}
    text = "\n".join(report.utility_table(u, None, audit))
    assert "| 25 | 0.500 | 0.600 (+0.100 [+0.050, +0.150]), M = 200 |" in text
    assert "| 400 | 0.800 |  |" in text
    assert "worth +40 [+12, beyond the curve]" in text
    assert "gain **pass**, above the uncontrolled control fail" in text
    assert "| pixel | controlled | 3 of 40 | 0.075 [0.020, 0.150] | 0.010 | 0.90 | 0.250 |" in text
    diff = {**_iv(0.03, 0.01, 0.05), "family": {"low": -0.01, "high": 0.07}}
    e = {"family_level": 0.9875, "conditions": {"normal": {"k": {
        "30": {"methods": {"adapter": {"gain": _iv(0.1, 0.08, 0.12)}, "adapter_unet_copy": {"gain": _iv(0.07, 0.05, 0.09)}},
               "differences": {"adapter - adapter_unet_copy": diff}}}}},
        "headline": {"checks": {"normal@k30": {"pass": False}}, "passed": 0, "total": 1}}
    text = "\n".join(report.efficiency_table(e))
    assert "| 30 | +0.100 [+0.080, +0.120] | +0.070 [+0.050, +0.090] | +0.030 [+0.010, +0.050] | [-0.010, +0.070] |" in text
    assert "0 of 1 (normal@k30 fail)" in text


def test_retrain_record_and_table_on_known_numbers():
    from pipelines.orchestration.flows import retrain_times

    out = {"scans": ["a", "b", "c"], "timing": {"ingest": 2.0, "prepare": 20.0},
           "pipeline": {"stages": [{"stage": "render", "status": "unchanged", "seconds": 1.5},
                                   {"stage": "embed", "status": "ran", "seconds": 10.0},
                                   {"stage": "train_base", "status": "ran", "seconds": 170.0}],
                        "register_seconds": 30.0}}
    rec = retrain_times(out, total=240.0)
    parts = {r["stage"]: r["seconds"] for r in rec["stages"]}
    assert parts["ingest"] == 2.0 and parts["embed"] == 10.0 and "render" not in parts  # unchanged: in "other"
    assert rec["landed"] == 3 and rec["total_seconds"] == 240.0
    assert sum(parts.values()) == pytest.approx(240.0)  # the rest is named, not lost
    lines = report.retrain_table(rec)
    assert "after 3 scans landed" in lines[0] and "| train_base | 170 |" in lines and "**240**" in lines[-2]
    assert retrain_times({"scans": [], "timing": {}, "pipeline": None}, 5.0) is None
