"""The evaluate stage's library: the quality bar on known intervals, the run's configuration,
a tiny end-to-end evaluation from models saved on disk (tiny real models, 1 DDIM step) and
per-scan seeding. The research baselines' trainers are tested with the research graph."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ctrlora.evaluation import quality_bar  # noqa: E402
from ctrlora.evaluation import run as evaluation  # noqa: E402
from ctrlora.evaluation.stats import Interval, bootstrap_diff, bootstrap_gain_ratio  # noqa: E402
from _models_helpers import perturb, tiny_eval_backbone  # noqa: E402

SIZE = 32  # detectors need H, W divisible by 8


# ---------------------------------------------------------------------------- quality bar
def _bar(gains, ratios, adapter_params=None, controlnet_params=1000):
    return quality_bar.quality_bar(gains, ratios, {"lighting": 100} if adapter_params is None else adapter_params,
                         controlnet_params, conditions=["segmentation", "canny", "lighting"],
                         combined=["segmentation", "lighting"], new_conditions=["lighting"])


def _noise(rng, n, std):
    e = rng.standard_normal(n)
    return std * (e - e.mean())  # zero mean: the sample mean is exactly the stated value


def _gain(value, noise=0.0, n=100, seed=0):
    """An interval on a paired difference of mean ``value`` (+ per-scan noise of that std)."""
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    return bootstrap_diff(base + value + _noise(rng, n, noise), base)


def _ratio(ratio, noise=0.0, n=100, seed=0):
    """An interval on a gain ratio of ``ratio``: single gain 0.3, combined gain 0.3 × ratio."""
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    return bootstrap_gain_ratio(base + 0.3 * ratio + _noise(rng, n, noise), base + 0.3, base)


def _good():
    return ({"segmentation": _gain(0.3), "canny": _gain(0.2), "lighting": _gain(0.15)},
            {"segmentation": _ratio(0.95), "lighting": _ratio(1.0)})


def test_quality_bar_thresholds_are_constants():
    assert quality_bar.LEVEL == 0.95
    assert quality_bar.CONTROL_MARGIN == {"segmentation": 0.2} and quality_bar.DEFAULT_CONTROL_MARGIN == 0.1
    assert quality_bar.control_margin("palette") == quality_bar.control_margin("normal") == quality_bar.control_margin("depth") == 0.1
    assert quality_bar.COMBINED_RATIO == 0.90 and quality_bar.PARAM_FRACTION == 0.15 and quality_bar.FULL_FINETUNE_RATIO == 0.90


def test_quality_bar_passes_on_clear_gains():
    bar = _bar(*_good())
    assert set(bar["checks"]) == {"controlled_vs_uncontrolled/segmentation", "controlled_vs_uncontrolled/canny",
                                  "controlled_vs_uncontrolled/lighting", "combined_vs_single/segmentation",
                                  "combined_vs_single/lighting", "adapter_param_fraction/lighting"}
    for k, v in bar["checks"].items():
        assert set(v) == {"value", "low", "high", "threshold", "n_scans", "seeds", "level", "pass"}, k
        assert v["pass"] is True, (k, v)
    seg = bar["checks"]["controlled_vs_uncontrolled/segmentation"]
    assert seg["value"] == seg["low"] == seg["high"] == pytest.approx(0.3) and seg["n_scans"] == 100
    assert seg["seeds"] == 1 and seg["threshold"] == 0.2
    assert bar["checks"]["adapter_param_fraction/lighting"]["value"] == pytest.approx(0.1)
    assert (bar["passed"], bar["total"], bar["pass"]) == (6, 6, True)
    json.dumps(bar)


def test_a_mean_above_the_bar_fails_when_its_interval_reaches_below():
    gains, ratios = _good()
    gains["segmentation"] = _gain(0.23, noise=0.3)  # mean ≥ 0.2, but the 95 % interval dips under
    ratios["lighting"] = _ratio(0.95, noise=0.3)
    bar = _bar(gains, ratios)
    seg, light = bar["checks"]["controlled_vs_uncontrolled/segmentation"], bar["checks"]["combined_vs_single/lighting"]
    assert seg["value"] >= 0.2 and seg["low"] < 0.2 and seg["pass"] is False
    assert light["value"] >= 0.9 and light["low"] < 0.9 and light["pass"] is False
    assert bar["passed"] == 4 and bar["pass"] is False


@pytest.mark.parametrize("which, interval", [
    ("segmentation", _gain(0.19)),   # +0.19 < 0.2
    ("canny", _gain(0.09)),          # +0.09 < 0.1
])
def test_quality_bar_fails_just_below_each_margin(which, interval):
    gains, ratios = _good()
    gains[which] = interval
    bar = _bar(gains, ratios)
    failed = [k for k, v in bar["checks"].items() if not v["pass"]]
    assert failed == [f"controlled_vs_uncontrolled/{which}"]


def test_quality_bar_boundaries_are_inclusive():
    exact = bootstrap_diff(np.full(20, 0.7), np.full(20, 0.5))  # 0.19999999999999996 in floating point
    gains, ratios = _good()
    gains["segmentation"] = exact
    ratios["lighting"] = _ratio(0.9)
    bar = _bar(gains, ratios, adapter_params={"lighting": 150})
    assert all(v["pass"] for v in bar["checks"].values()), bar
    over = _bar(gains, {**ratios, "lighting": _ratio(0.89)}, adapter_params={"lighting": 151})
    assert not over["checks"]["combined_vs_single/lighting"]["pass"]
    assert not over["checks"]["adapter_param_fraction/lighting"]["pass"]


def test_quality_bar_missing_or_undefined_inputs_fail():
    gains, ratios = _good()
    del gains["canny"]
    ratios["segmentation"] = bootstrap_gain_ratio(np.ones(10), np.zeros(10), np.zeros(10) + 0.5)  # single gain < 0
    bar = _bar(gains, ratios, adapter_params={}, controlnet_params=None)
    checks = bar["checks"]
    assert checks["controlled_vs_uncontrolled/canny"] == {**quality_bar.missing_check(0.1)} and not checks[
        "controlled_vs_uncontrolled/canny"]["pass"]
    assert checks["combined_vs_single/segmentation"]["value"] is None
    assert not checks["combined_vs_single/segmentation"]["pass"]
    assert checks["adapter_param_fraction/lighting"]["value"] is None
    assert bar["passed"] == 3 and bar["total"] == 6
    json.dumps(bar)


def test_quality_bar_refuses_intervals_of_another_level():
    with pytest.raises(ValueError, match="95"):
        quality_bar.interval_check(Interval(0.5, 0.4, 0.6, 10, level=0.8), 0.2)


# ---------------------------------------------------------------------------- configuration
def test_eval_config_guidance_passes_and_validation():
    cfg = evaluation.EvalConfig(["segmentation"], ["lighting"], guidance=[7.5, 1.0], gate_guidance=1.0,
                       other_guidance_max_scans=64)
    assert cfg.passes(200) == [(1.0, 200), (7.5, 64)]  # the gate first, on every scan
    assert cfg.passes(10) == [(1.0, 10), (7.5, 10)]
    assert evaluation.EvalConfig(["segmentation"], ["lighting"], guidance=[1.0], other_guidance_max_scans=None).passes(5) == \
        [(1.0, 5)]
    assert evaluation.guidance_key(1) == "1.0" and evaluation.guidance_key(7.5) == "7.5"
    with pytest.raises(ValueError, match="gate_guidance"):
        evaluation.EvalConfig(["segmentation"], ["lighting"], guidance=[7.5], gate_guidance=1.0)
    with pytest.raises(ValueError, match="without an adapter"):
        evaluation.EvalConfig(["segmentation"], ["normal"])  # default combination needs lighting
    with pytest.raises(ValueError, match="distinct"):
        evaluation.EvalConfig(["segmentation"], ["lighting"], guidance=[1.0, 1.0])
    with pytest.raises(ValueError, match="condition_weights names"):
        evaluation.EvalConfig(["segmentation"], ["lighting"], condition_weights={"canny": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        evaluation.EvalConfig(["segmentation"], ["lighting"], condition_weights={"segmentation": 0.0})
    cfg = evaluation.EvalConfig(["segmentation"], ["lighting"], condition_weights={"segmentation": 2.0})
    assert (cfg.weight("segmentation"), cfg.weight("lighting")) == (2.0, 1.0)


# ---------------------------------------------------------------------------- tiny models


def _tiny_data(n, seed):
    from ctrlora.data.conditions import color_lut
    from ctrlora.evaluation.detectors import CannyParams, detect_canny

    rng = np.random.default_rng(seed)
    photos = (rng.random((n, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, (n, SIZE, SIZE)).astype(np.int64)
    seg = color_lut()[labels].astype(np.uint8)
    light = np.repeat((rng.random((n, SIZE, SIZE, 1)) * 255).astype(np.uint8), 3, -1)
    edges = np.repeat(detect_canny(photos, CannyParams())[..., None], 3, -1).astype(np.uint8) * 255
    return evaluation.EvalData([f"s{i:03d}" for i in range(n)], ["dental photo of both jaws"] * n, photos,
                      {"segmentation": seg, "canny": edges, "lighting": light}, labels)


def test_per_scan_fidelity_on_the_ground_truth_itself():
    """Canny re-detected from the very photographs the edges came from: F1 = 1 on every scan."""
    data = _tiny_data(3, 0)
    per = evaluation.per_scan_fidelity("canny", data.photos, data, {})
    assert per.shape == (3,) and (per == 1.0).all()
    with pytest.raises(ValueError, match="generated images for"):
        evaluation.per_scan_fidelity("canny", data.photos[:2], data, {})


def _save_tiny_models(root: Path, base_conditions, new_conditions):
    """A tiny backbone, a base ControlNet and one adapter per condition, saved as the training
    stages save them; returns the adapter folders."""
    from ctrlora.models import adapters
    from ctrlora.models.controlnet import CtrLoRAControlNet

    torch.manual_seed(0)
    bb = tiny_eval_backbone(SIZE)
    bb.save(root / "backbone")
    cn = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    perturb(cn, 1)  # non-zero zero-convs: the control does something
    cn.save_pretrained(root / "base")
    want = adapters.base_hash(cn)
    dirs = {}
    for c in [*base_conditions, *new_conditions]:
        adapters.add_adapter(cn, c, rank=2, own_modules=c in new_conditions)
        dirs[c] = adapters.save_adapter(cn, c, root / "adapters" / c, want)
    return dirs


_DETECTORS: dict = {}  # the tiny run's detectors, by its root


def _detectors(root):
    return _DETECTORS[str(root)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ctrlora.evaluation.detectors import DetectorConfig, train_detector
    from ctrlora.evaluation.loading import detector_targets

    root = tmp_path_factory.mktemp("eval")
    dirs = _save_tiny_models(root, ["segmentation", "canny"], ["lighting"])
    models = evaluation.load_models(root / "backbone", root / "base", dirs)
    train, test = _tiny_data(8, 1), _tiny_data(4, 2)
    detectors = {"segmentation": train_detector(DetectorConfig(task="segmentation", channels=10, width=4, epochs=1),
                                                train.photos, train.labels, progress=False),
                 "lighting": train_detector(DetectorConfig(task="regression", channels=1, width=4, epochs=1),
                                            train.photos, detector_targets("lighting", train), progress=False)}
    cfg = evaluation.EvalConfig(["segmentation", "canny"], ["lighting"], combined={"segmentation": 1.0, "lighting": 0.5},
                       condition_weights={"canny": 2.0},
                       sampling=evaluation.SamplingConfig(steps=1, batch_size=4, seed=5), guidance=[1.0, 2.0],
                       gate_guidance=1.0, other_guidance_max_scans=3, n_boot=200, grid_rows=3)
    calls = []
    real_generate = evaluation.generate

    def counting_generate(pipe, data, conditions, s, **kw):
        calls.append((s.guidance_scale, tuple(sorted(conditions)), len(data),
                      tuple(conditions[c][1] for c in sorted(conditions))))
        return real_generate(pipe, data, conditions, s, **kw)

    _DETECTORS[str(root)] = detectors
    evaluation.generate = counting_generate
    try:
        m = evaluation.run_evaluation(models, test, detectors, cfg, root / "reports", progress=False, log=lambda s: None)
    finally:
        evaluation.generate = real_generate
    return m, models, cfg, root, calls


def test_load_models_counts_the_controlnet_itself(tiny_run):
    from ctrlora.models.controlnet import CtrLoRAControlNet

    m, models, _, root, _ = tiny_run
    plain = CtrLoRAControlNet.from_pretrained(root / "base")
    assert models.controlnet_params == sum(p.numel() for p in plain.parameters())
    assert set(models.adapter_params) == {"segmentation", "canny", "lighting"}
    assert 0 < models.adapter_params["lighting"] < models.controlnet_params
    assert m["params"]["controlnet"] == models.controlnet_params
    assert m["params"]["adapter_fraction"]["lighting"] == pytest.approx(
        models.adapter_params["lighting"] / models.controlnet_params, abs=1e-6)


def test_tiny_evaluation_schema(tiny_run):
    m, _, cfg, _, _ = tiny_run
    json.dumps(evaluation.json_ready(m))  # serialisable
    assert set(m) == {"segmentation", "canny", "lighting", "combined", "uncontrolled", "quality_bar", "at_guidance",
                      "params", "protocol", "timing_seconds"}
    for c, metric in (("segmentation", "miou"), ("canny", "edge_f1"), ("lighting", "ssim")):
        e = m[c]
        assert e["metric"] == metric and e["fidelity"] == e[metric], c
        assert e["n_scans"] == 4 and e["guidance"] == 1.0
        assert {"image_psnr", "image_ssim", "uncontrolled", "gain"} <= set(e)
        assert set(e["gain"]) == {"value", "low", "high", "n", "level"}
        assert e["gain"]["value"] == pytest.approx(e["fidelity"] - e["uncontrolled"], abs=2e-6)
        assert e["gain"]["low"] <= e["gain"]["value"] <= e["gain"]["high"]
    assert m["lighting"]["adapter_params"] > 0
    comb = m["combined"]
    assert comb["weights"] == {"segmentation": 1.0, "lighting": 0.5} and comb["n_scans"] == 4
    for c in ("segmentation", "lighting"):
        assert set(comb[c]) == {"fidelity", "gain", "single_gain", "ratio"}
        assert comb[c]["single_gain"] == m[c]["gain"]["value"]
    qb = m["quality_bar"]
    assert qb["gates"] is True and qb["guidance"] == 1.0 and qb["level"] == 0.95
    assert set(qb["checks"]) == {"controlled_vs_uncontrolled/segmentation", "controlled_vs_uncontrolled/canny",
                                 "controlled_vs_uncontrolled/lighting", "combined_vs_single/segmentation",
                                 "combined_vs_single/lighting", "adapter_param_fraction/lighting"}
    assert qb["checks"]["controlled_vs_uncontrolled/canny"]["low"] == m["canny"]["gain"]["low"]
    other = m["at_guidance"]["2.0"]
    assert set(other) == {"guidance", "n_scans", "conditions", "combined", "uncontrolled", "quality_bar"}
    assert other["n_scans"] == 3 and other["conditions"]["lighting"]["n_scans"] == 3
    assert other["quality_bar"]["gates"] is False and other["quality_bar"]["total"] == qb["total"]
    p = m["protocol"]
    assert p["split"] == "test" and p["gate_guidance"] == 1.0 and p["scans_per_guidance"] == {"1.0": 4, "2.0": 3}
    assert p["bootstrap"]["n_boot"] == 200 and p["bootstrap"]["level"] == 0.95


def test_tiny_evaluation_generates_each_image_once(tiny_run):
    _, _, cfg, _, calls = tiny_run
    per_pass = [(), ("canny",), ("lighting",), ("lighting", "segmentation"), ("segmentation",)]
    assert sorted(c[1] for c in calls if c[0] == 1.0) == per_pass
    assert sorted(c[1] for c in calls if c[0] == 2.0) == per_pass
    assert {c[2] for c in calls if c[0] == 1.0} == {4} and {c[2] for c in calls if c[0] == 2.0} == {3}
    # each condition's own pass at its condition_weights entry (1.0 where missing), the
    # combination at its own weights
    weights = {c[1]: c[3] for c in calls if c[0] == 1.0}
    assert weights[("canny",)] == (2.0,) and weights[("segmentation",)] == (1.0,)
    assert weights[("lighting", "segmentation")] == (0.5, 1.0)
    assert m_weights(tiny_run) == {"segmentation": 1.0, "canny": 2.0, "lighting": 1.0}


def m_weights(run) -> dict:
    m = run[0]
    assert m["canny"]["weight"] == 2.0 and m["segmentation"]["weight"] == 1.0
    return m["protocol"]["condition_weights"]


def test_tiny_evaluation_reports_and_per_scan_scores(tiny_run):
    m, _, cfg, root, _ = tiny_run
    rep = root / "reports"
    for f in ("segmentation", "canny", "lighting", "combined", "uncontrolled"):
        assert (rep / f"{f}.png").stat().st_size > 0, f
        assert (rep / "guidance_2.0" / f"{f}.png").stat().st_size > 0, f
    with open(rep / "per_scan.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"guidance", "model", "condition", "scan_id", "fidelity"}

    def col(g, model, c):
        return np.array([float(r["fidelity"]) for r in rows if r["guidance"] == g and r["model"] == model
                         and r["condition"] == c])

    for c in cfg.conditions:  # the reported means are the means of the per-scan scores
        assert col("1.0", c, c).mean() == pytest.approx(m[c]["fidelity"], abs=1e-6)
        assert col("1.0", "uncontrolled", c).mean() == pytest.approx(m[c]["uncontrolled"], abs=1e-6)
        assert len(col("2.0", c, c)) == 3
        assert bootstrap_diff(col("1.0", c, c), col("1.0", "uncontrolled", c), n_boot=200).value == pytest.approx(
            m[c]["gain"]["value"], abs=2e-6)
    assert col("1.0", "combined", "lighting").mean() == pytest.approx(m["combined"]["lighting"]["fidelity"], abs=1e-6)


def test_generation_is_per_scan_seeded():
    """A scan's image does not depend on the batch it is generated in (fair comparisons)."""
    from ctrlora.models.adapters import add_adapter
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.sampling import CtrLoRAPipeline

    torch.manual_seed(0)
    bb = tiny_eval_backbone(SIZE)
    net = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    perturb(net, 1)
    add_adapter(net, "lighting", rank=2)
    pipe = CtrLoRAPipeline.from_components(bb, net.eval())
    data = _tiny_data(3, 3)
    a = evaluation.generate(pipe, data, {"lighting": ("lighting", 1.0, "lighting")}, evaluation.SamplingConfig(steps=1, batch_size=3),
                   progress=False)
    b = evaluation.generate(pipe, data, {"lighting": ("lighting", 1.0, "lighting")}, evaluation.SamplingConfig(steps=1, batch_size=2),
                   progress=False)
    assert a.dtype == np.uint8 and a.shape == (3, SIZE, SIZE, 3)
    # batched BLAS may round one 8-bit level differently; the seeds (noise) are the same
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_job_runner_gives_the_run_it_replaces(tiny_run):
    """Generation handed to a runner (as the stage hands it to worker processes; here jobs run in
    reverse order in this process) yields the same metrics as the run's own sequential loop."""
    from ctrlora.sampling import CtrLoRAPipeline

    m, models, cfg, root, _ = tiny_run
    pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet)
    pipe.set_progress_bar_config(disable=True)
    test = _tiny_data(4, 2)
    seen: list = []

    def runner(jobs):
        seen.extend(jobs)
        return [evaluation.run_job(pipe, test, j, cfg.sampling) for j in jobs[::-1]][::-1]

    again = evaluation.run_evaluation(models, test, _detectors(root), cfg, None, progress=False, log=lambda s: None,
                                      runner=runner)
    assert [(j.guidance, j.n_scans, j.model) for j in seen] == [
        (g, n, model) for g, n in cfg.passes(4) for model in ["uncontrolled", "segmentation", "canny", "lighting",
                                                               "combined"]]
    strip = lambda d: {k: v for k, v in d.items() if k != "timing_seconds"}  # noqa: E731
    assert json.dumps(evaluation.json_ready(strip(again)), sort_keys=True) == json.dumps(
        evaluation.json_ready(strip(m)), sort_keys=True)
