"""The evaluate stage's library and the baseline trainers: quality bar on known numbers, a tiny
end-to-end evaluation (random tiny models, 1-2 DDIM steps) and a few steps of each baseline."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ctrlora.evaluation import quality_bar as Q  # noqa: E402
from ctrlora.evaluation import run as R  # noqa: E402

SIZE = 32  # detectors need H, W divisible by 8


# ---------------------------------------------------------------------------- quality bar
def _metrics(**over):
    m = {
        "segmentation": {"fidelity": 0.7},
        "canny": {"fidelity": 0.5},
        "lighting": {"fidelity": 0.8, "trainable_params": 100},
        "combined": {"segmentation": {"fidelity": 0.65}, "lighting": {"fidelity": 0.75}},
        "baselines": {
            "uncontrolled": {"segmentation": {"fidelity": 0.45}, "canny": {"fidelity": 0.35},
                             "lighting": {"fidelity": 0.6}},
            "full_finetune": {"fidelity": 0.85, "trainable_params": 1000},
            "random_base": {"fidelity": 0.7, "trainable_params": 100},
        },
    }
    for path, value in over.items():
        node = m
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        if value is None:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return m


def _bar(m):
    return Q.evaluate_quality_bar(m, ["segmentation", "canny", "lighting"], ["lighting"], "lighting",
                                  ["segmentation", "lighting"])


def test_quality_bar_thresholds_are_the_issues():
    assert Q.CONTROL_MARGIN["segmentation"] == 0.2
    assert Q.DEFAULT_CONTROL_MARGIN == 0.1
    assert Q.FULL_FINETUNE_RATIO == 0.90
    assert Q.PARAM_FRACTION == 0.15
    assert Q.COMBINED_RATIO == 0.90


def test_quality_bar_passes_on_good_numbers():
    bar = _bar(_metrics())
    assert set(bar) == {"controlled_vs_uncontrolled/segmentation", "controlled_vs_uncontrolled/canny",
                        "controlled_vs_uncontrolled/lighting", "adapter_vs_full_finetune/lighting",
                        "adapter_param_fraction/lighting", "adapter_vs_random_base/lighting",
                        "combined_vs_single/segmentation", "combined_vs_single/lighting", "all"}
    for k, v in bar.items():
        assert set(v) == {"value", "threshold", "pass"}, k
        assert v["pass"] is True, (k, v)
    assert bar["controlled_vs_uncontrolled/segmentation"]["value"] == pytest.approx(0.25)
    assert bar["adapter_vs_full_finetune/lighting"]["value"] == pytest.approx(0.8 / 0.85, abs=1e-6)
    assert bar["adapter_param_fraction/lighting"]["value"] == pytest.approx(0.1)
    assert bar["all"] == {"value": 8.0, "threshold": 8.0, "pass": True}


@pytest.mark.parametrize("over, check", [
    ({"segmentation__fidelity": 0.64}, "controlled_vs_uncontrolled/segmentation"),  # +0.19 < 0.2
    ({"canny__fidelity": 0.44}, "controlled_vs_uncontrolled/canny"),               # +0.09 < 0.1
    ({"baselines__full_finetune__fidelity": 0.9}, "adapter_vs_full_finetune/lighting"),  # 0.889 < 0.9
    ({"lighting__trainable_params": 151}, "adapter_param_fraction/lighting"),      # 0.151 > 0.15
    ({"baselines__random_base__fidelity": 0.8}, "adapter_vs_random_base/lighting"),  # a tie does not beat
    ({"combined__lighting__fidelity": 0.71}, "combined_vs_single/lighting"),       # 0.8875 < 0.9
    ({"baselines__full_finetune": None},                                           # missing = fail
     ["adapter_vs_full_finetune/lighting", "adapter_param_fraction/lighting"]),
    ({"baselines__uncontrolled__canny": None}, "controlled_vs_uncontrolled/canny"),
])
def test_quality_bar_fails_just_past_each_threshold(over, check):
    checks = [check] if isinstance(check, str) else check
    bar = _bar(_metrics(**over))
    failed = [k for k, v in bar.items() if not v["pass"] and k != "all"]
    assert failed == checks
    assert bar["all"]["pass"] is False and bar["all"]["value"] == bar["all"]["threshold"] - len(checks)


def test_quality_bar_boundaries_are_inclusive_where_the_issue_says_at_least():
    bar = _bar(_metrics(segmentation__fidelity=0.7, baselines__uncontrolled__segmentation__fidelity=0.5,
                        baselines__full_finetune__fidelity=0.8 / 0.9, lighting__trainable_params=150))
    assert bar["controlled_vs_uncontrolled/segmentation"]["pass"]  # exactly +0.2
    assert bar["adapter_vs_full_finetune/lighting"]["pass"]         # exactly 90 %
    assert bar["adapter_param_fraction/lighting"]["pass"]           # exactly 15 %


def test_ablation_summary():
    s = R.ablation_summary([(0, 0.2), (100, 0.3), (200, 0.6), (300, 0.65), (500, 0.7)])
    assert s["final"] == pytest.approx(0.7) and s["gain"] == pytest.approx(0.5)
    assert s["steps_to_90pct"] == 300.0       # 0.65 - 0.2 = 0.45 >= 0.9 * 0.5
    assert s["max_jump_fraction"] == pytest.approx(0.6)  # 0.3 -> 0.6
    flat = R.ablation_summary([(0, 0.5), (100, 0.4)])
    assert flat["steps_to_90pct"] is None and flat["max_jump_fraction"] is None


# ---------------------------------------------------------------------------- tiny models
def _tiny_backbone():
    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.backbone import TinyBackboneConfig, build_tiny_backbone

    cfg = TinyBackboneConfig(image_size=SIZE, vae_block_out_channels=(32, 32), unet_block_out_channels=(32, 32),
                             unet_attention_heads=(2, 2), unet_layers_per_block=1, text_layers=1, vae_scaling_factor=0.5)
    return build_tiny_backbone(cfg, CAPTION_VOCABULARY)


def _perturb(module, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _tiny_data(n, seed):
    from ctrlora.evaluation.detectors import CannyParams, detect_canny

    rng = np.random.default_rng(seed)
    photos = (rng.random((n, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, (n, SIZE, SIZE)).astype(np.int64)
    from ctrlora.data.conditions import color_lut

    seg = color_lut()[labels].astype(np.uint8)
    light = np.repeat((rng.random((n, SIZE, SIZE, 1)) * 255).astype(np.uint8), 3, -1)
    edges = np.repeat(detect_canny(photos, CannyParams())[..., None], 3, -1).astype(np.uint8) * 255
    return R.EvalData([f"s{i:03d}" for i in range(n)], ["dental photo of both jaws"] * n, photos,
                      {"segmentation": seg, "canny": edges, "lighting": light}, labels)


def test_score_on_the_ground_truth_itself():
    """Canny re-detected from the very photographs the edges came from: F1 = 1."""
    data = _tiny_data(3, 0)
    r = R.score("canny", data.photos, data, {})
    assert r["fidelity"] == 1.0 and r["edge_f1"] == 1.0
    assert r["image_psnr"] == 100.0 and r["image_ssim"] == pytest.approx(1.0)


def test_tiny_evaluation_run(tmp_path):
    from ctrlora.evaluation.detectors import DetectorConfig, train_detector
    from ctrlora.models.adapters import add_adapter, adapter_param_counts
    from ctrlora.models.controlnet import CtrLoRAControlNet

    torch.manual_seed(0)
    bb = _tiny_backbone()
    vsf = bb.vae_scale_factor

    def cn(kind="vae", seed=1):
        m = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding=kind, vae_scale_factor=vsf)
        _perturb(m, seed)  # non-zero zero-convs: the control does something
        return m.eval()

    main = cn()
    for c in ("segmentation", "canny"):
        add_adapter(main, c, rank=2, own_modules=False)
    add_adapter(main, "lighting", rank=2, own_modules=True)
    rnd = cn(seed=2)
    add_adapter(rnd, "lighting", rank=2, own_modules=True)
    n_lighting = 1234
    models = R.EvalModels(bb, main, trainable_params={"lighting": n_lighting}, random_base=rnd,
                          full_finetune=cn(seed=3), cnn={1: cn("cnn", 4), 2: cn("cnn", 5)},
                          vae_scratch={1: cn(seed=6), 2: cn(seed=7)},
                          baseline_params={"random_base": n_lighting, "full_finetune": 99999, "cnn": 1, "vae_scratch": 1})
    train, test = _tiny_data(8, 1), _tiny_data(4, 2)
    detectors = {"segmentation": train_detector(DetectorConfig(task="segmentation", channels=10, width=4, epochs=1),
                                                train.photos, train.labels, progress=False),
                 "lighting": train_detector(DetectorConfig(task="regression", channels=1, width=4, epochs=1),
                                            train.photos, R.detector_targets("lighting", train), progress=False)}
    cfg = R.EvalConfig(["segmentation", "canny"], ["lighting"], combined={"segmentation": 1.0, "lighting": 0.5},
                       baseline_condition="lighting",
                       sampling=R.SamplingConfig(steps=1, guidance_scale=2.0, batch_size=4, seed=5),
                       ablation_max_scans=2, grid_rows=3)
    m = R.run_evaluation(models, test, detectors, cfg, tmp_path / "reports", progress=False, log=lambda s: None)
    json.dumps(R.json_ready(m))  # serialisable

    assert set(m) == {"segmentation", "canny", "lighting", "combined", "baselines", "quality_bar"}
    for c in ("segmentation", "canny", "lighting"):
        assert {"fidelity", "image_psnr", "image_ssim", "n_scans"} <= set(m[c]), c
        assert m[c]["n_scans"] == 4
    assert m["segmentation"]["fidelity"] == m["segmentation"]["miou"]
    assert m["canny"]["fidelity"] == m["canny"]["edge_f1"]
    assert m["lighting"]["fidelity"] == m["lighting"]["ssim"]
    assert m["lighting"]["trainable_params"] == n_lighting and "trainable_params" not in m["segmentation"]
    assert set(m["combined"]) == {"segmentation", "lighting", "image_psnr", "image_ssim", "weights"}
    assert m["combined"]["weights"] == {"segmentation": 1.0, "lighting": 0.5}
    bl = m["baselines"]
    assert set(bl) == {"uncontrolled", "random_base", "full_finetune", "cnn", "vae_scratch"}
    assert set(bl["uncontrolled"]) == {"segmentation", "canny", "lighting", "image_psnr", "image_ssim"}
    assert bl["full_finetune"]["trainable_params"] == 99999
    for name in ("cnn", "vae_scratch"):
        assert set(bl[name]) == {"step_00001", "step_00002", "summary", "trainable_params", "n_scans"}
        assert bl[name]["n_scans"] == 2
    # controlled and uncontrolled generations differ (the control is applied)
    assert m["lighting"]["image_psnr"] != bl["uncontrolled"]["image_psnr"]
    qb = m["quality_bar"]
    assert qb["adapter_param_fraction/lighting"]["value"] == pytest.approx(n_lighting / 99999, abs=1e-6)
    assert qb == Q.evaluate_quality_bar(m, cfg.conditions, ["lighting"], "lighting", ["segmentation", "lighting"])
    rep = tmp_path / "reports"
    for f in ("segmentation", "canny", "lighting", "combined", "uncontrolled", "baselines_lighting",
              "embedding_ablation", "fidelity_vs_steps"):
        assert (rep / f"{f}.png").stat().st_size > 0, f
    lines = (rep / "fidelity_vs_steps.csv").read_text().splitlines()
    assert lines[0] == "step,cnn,vae_scratch" and [ln.split(",")[0] for ln in lines[1:]] == ["0", "1", "2"]


def test_generation_is_per_scan_seeded():
    """A scan's image does not depend on the batch it is generated in (fair comparisons)."""
    from ctrlora.models.adapters import add_adapter
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.pipeline import CtrLoRAPipeline

    torch.manual_seed(0)
    bb = _tiny_backbone()
    net = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    _perturb(net, 1)
    add_adapter(net, "lighting", rank=2)
    pipe = CtrLoRAPipeline.from_components(bb, net.eval())
    data = _tiny_data(3, 3)
    a = R.generate(pipe, data, {"lighting": ("lighting", 1.0, "lighting")}, R.SamplingConfig(steps=1, batch_size=3),
                   progress=False)
    b = R.generate(pipe, data, {"lighting": ("lighting", 1.0, "lighting")}, R.SamplingConfig(steps=1, batch_size=2),
                   progress=False)
    assert a.dtype == np.uint8 and a.shape == (3, SIZE, SIZE, 3)
    # batched BLAS may round one 8-bit level differently; the seeds (noise) are the same
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# ---------------------------------------------------------------------------- baseline trainers
def test_baseline_trainers_few_steps(tmp_path):
    from PIL import Image

    from ctrlora.models import adapters as A
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.embed import ConditionEmbeds, EmbedCache, encode_text
    from pipelines.train_baseline import condition_images_for_cache, train_one

    torch.manual_seed(0)
    bb = _tiny_backbone()
    n, lat = 6, SIZE // bb.vae_scale_factor
    ids = [f"s{i}" for i in range(n)]
    caps = ["dental photo of both jaws"] * n
    g = torch.Generator().manual_seed(0)
    cache = EmbedCache(ids, ["train"] * 4 + ["test"] * 2, caps, 0.5,
                       torch.randn(n, 4, lat, lat, generator=g), torch.full((n, 4, lat, lat), -4.0),
                       encode_text(bb.text_encoder, bb.tokenizer, caps), encode_text(bb.text_encoder, bb.tokenizer, [""]),
                       {"lighting": ConditionEmbeds(torch.arange(n).flip(0), torch.randn(n, 4, lat, lat, generator=g),
                                                    torch.full((n, 4, lat, lat), -4.0))})
    prepared = tmp_path / "prepared"
    (prepared / "conditions" / "lighting").mkdir(parents=True)
    for i, sid in enumerate(ids):
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(prepared / "conditions" / "lighting" / f"{sid}.png")
    imgs = condition_images_for_cache(prepared, cache, "lighting")
    assert imgs.shape == (n, 3, SIZE, SIZE)
    # pair row 0 belongs to photo row 5 (flipped index): its image is scan s5's
    assert float(imgs[0].mean()) == pytest.approx(200 / 255, abs=1e-6)

    base = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    _perturb(base, 9)
    base.save_pretrained(tmp_path / "base")
    recipe = {"train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "log_every": 2, "seed": 0},
              "rank": 2, "prompt_dropout": 0.3, "max_pairs": None}
    cfg = {"init_seed": 0, "full_learning_rate": 1e-4, "save_steps": [1]}
    out = tmp_path / "baselines"
    infos = {name: train_one(name, bb, cache, "lighting", recipe, cfg, out / name, base_dir=tmp_path / "base",
                             prepared=prepared) for name in ("random_base", "full_finetune", "cnn", "vae_scratch")}
    for name, info in infos.items():
        assert info["steps"] == 2 and len(info["history"]) == 2, name
        assert json.loads((out / name / "baseline.json").read_text())["trainable_params"] == info["trainable_params"]

    # random_base: a fresh random base (not the UNet's weights), only the adapter trained
    rb = CtrLoRAControlNet.from_pretrained(out / "random_base" / "base")
    w_rb = rb.down_blocks[0].resnets[0].conv1.weight
    assert not torch.equal(w_rb, bb.unet.down_blocks[0].resnets[0].conv1.weight)
    A.load_adapter(rb, out / "random_base" / "adapter")  # records this base's hash
    assert infos["random_base"]["trainable_params"] == A.read_adapter_config(out / "random_base" / "adapter")["num_params"]
    # full fine-tune: every weight of the trained base trains, and moved
    ff = CtrLoRAControlNet.from_pretrained(out / "full_finetune" / "controlnet")
    assert infos["full_finetune"]["trainable_params"] == infos["full_finetune"]["total_params"] == \
        sum(p.numel() for p in base.parameters())
    assert not torch.equal(ff.controlnet_mid_block.weight, base.controlnet_mid_block.weight)
    assert infos["random_base"]["trainable_params"] <= 0.5 * infos["full_finetune"]["trainable_params"]
    # cnn / vae_scratch: snapshots at the save steps and the last step; UNet-initialised
    for name, kind in (("cnn", "cnn"), ("vae_scratch", "vae")):
        assert infos[name]["save_steps"] == [1, 2]
        s1 = CtrLoRAControlNet.from_pretrained(out / name / "step_00001")
        s2 = CtrLoRAControlNet.from_pretrained(out / name / "step_00002")
        assert s1.config.condition_embedding == kind
        assert not torch.equal(s1.controlnet_mid_block.weight, s2.controlnet_mid_block.weight)
        assert infos[name]["trainable_params"] == infos[name]["total_params"]
    assert infos["cnn"]["trainable_params"] > infos["vae_scratch"]["trainable_params"]  # + hint CNN

    with pytest.raises(ValueError, match="save_steps"):
        train_one("vae_scratch", bb, cache, "lighting", recipe, {**cfg, "save_steps": [5]}, out / "bad")
    with pytest.raises(ValueError, match="unknown baseline"):
        train_one("nope", bb, cache, "lighting", recipe, cfg, out / "bad")
