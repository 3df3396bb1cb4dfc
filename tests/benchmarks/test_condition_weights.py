"""benchmarks/condition_weights.py: the choice rule on a known table, and the sweep on tiny real
models (1 DPM step): one cell per (condition, weight), gains that are the paired difference the
evaluate stage computes, and weight 0 of the residuals giving exactly no control."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import condition_weights as cw  # noqa: E402
from _models_helpers import perturb, tiny_eval_backbone  # noqa: E402

SIZE = 32


def _cells(table: dict) -> list[dict]:
    return [{"condition": c, "weight": w, "gain": {"value": g}} for c, row in table.items() for w, g in row.items()]


def test_choice_is_the_smallest_weight_keeping_ninety_percent_everywhere():
    # the validation figures the default was chosen on (params.yaml evaluate.condition_weights)
    table = {"segmentation": {1.0: 0.259, 2.0: 0.292, 3.0: 0.300}, "canny": {1.0: 0.082, 2.0: 0.101, 3.0: 0.103},
             "normal": {1.0: 0.116, 2.0: 0.135, 3.0: 0.140}}
    got = cw.choose(_cells(table), list(table), [1.0, 2.0, 3.0])
    assert got["weight"] == 2.0  # at 1, segmentation keeps 0.863 < 0.9
    assert got["kept"]["1.0"]["segmentation"] == pytest.approx(0.259 / 0.300, abs=1e-4)
    assert got["best_gain"] == {"segmentation": 0.300, "canny": 0.103, "normal": 0.140}
    # a condition that gains nothing at any weight: no weight qualifies
    table["canny"] = {1.0: -0.01, 2.0: 0.0, 3.0: -0.02}
    assert cw.choose(_cells(table), list(table), [1.0, 2.0, 3.0])["weight"] is None


@pytest.fixture(scope="module")
def tiny_sweep():
    from ctrlora.data.conditions import quantise_palette
    from ctrlora.evaluation.detectors import CannyParams, detect_canny
    from ctrlora.evaluation.generation import SamplingConfig
    from ctrlora.evaluation.loading import EvalData
    from ctrlora.models import adapters
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.sampling import CtrLoRAPipeline

    torch.set_num_threads(1)
    torch.manual_seed(0)
    bb = tiny_eval_backbone(SIZE)
    cn = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    perturb(cn, 1)  # non-zero zero-convs: the control changes the image
    for c in ("canny", "palette"):
        adapters.add_adapter(cn, c, rank=2, own_modules=True)
    pipe = CtrLoRAPipeline.from_components(bb, cn)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    n = 6
    photos = (rng.random((n, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    edges = np.repeat(detect_canny(photos, CannyParams())[..., None], 3, -1).astype(np.uint8) * 255
    palette = np.stack([quantise_palette(p) for p in photos]).astype(np.uint8)
    data = EvalData([f"s{i}" for i in range(n)], ["dental photo of both jaws"] * n, photos,
                    {"canny": edges, "palette": palette}, None)
    sampling = SamplingConfig(steps=1, scheduler="dpm_karras", guidance_scale=1.0, batch_size=4, seed=3)
    res = cw.sweep(pipe, data, {}, ["canny", "palette"], [0.0, 1.0, 2.0], sampling, ["canny", "palette"],
                   n_boot=100, log=lambda s: None)
    return res, pipe, data, sampling


def test_sweep_cells_are_evaluates_paired_gains(tiny_sweep):
    from ctrlora.evaluation.generation import generate
    from ctrlora.evaluation.scoring import per_scan_fidelity

    res, pipe, data, sampling = tiny_sweep
    assert [(c["condition"], c["weight"]) for c in res["cells"]] == [
        (c, w) for c in ("canny", "palette") for w in (0.0, 1.0, 2.0)]
    for cell in res["cells"]:
        g = cell["gain"]
        assert g["low"] <= g["value"] <= g["high"]
        assert g["value"] == pytest.approx(np.mean(cell["per_scan_gain"]), abs=1e-5)
        assert cell["fidelity"] - cell["uncontrolled"] == pytest.approx(g["value"], abs=2e-6)
    by = {(c["condition"], c["weight"]): c for c in res["cells"]}
    # weight 0 scales every residual to zero: the image is the uncontrolled one, gain exactly 0
    for c in ("canny", "palette"):
        assert by[(c, 0.0)]["per_scan_gain"] == [0.0] * len(data)
    # a cell recomputed outside the sweep: the same generation and scoring as evaluate's
    images = generate(pipe, data, {"palette": ("palette", 2.0, "palette")}, sampling, progress=False)
    unc = generate(pipe, data, {}, sampling, progress=False)
    want = per_scan_fidelity("palette", images, data, {}) - per_scan_fidelity("palette", unc, data, {})
    np.testing.assert_allclose(by[("palette", 2.0)]["per_scan_gain"], want, atol=1e-6)
    assert by[("palette", 2.0)]["per_scan_gain"] != by[("palette", 1.0)]["per_scan_gain"]


def test_sweep_combined_ratios_and_choice(tiny_sweep):
    res = tiny_sweep[0]
    assert [r["weight"] for r in res["combined"]] == [0.0, 1.0, 2.0]
    for row in res["combined"]:
        for c in ("canny", "palette"):
            assert set(row[c]) == {"gain", "ratio"}
    assert res["choice"]["weight"] in (None, 0.0, 1.0, 2.0)
    assert set(res["choice"]["kept"]) == {"0.0", "1.0", "2.0"}


def test_cli_refuses_a_combination_outside_the_sweep():
    args = cw.parse_args(["--conditions", "canny", "--combined", "segmentation", "lighting"])
    with pytest.raises(SystemExit, match="not swept"):
        cw.run(args)
    assert cw.parse_args(["--combined", "none"]).combined is None
    with pytest.raises(SystemExit):
        cw.parse_args(["--weights", "0"])
