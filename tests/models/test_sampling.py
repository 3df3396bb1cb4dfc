"""Sampling pipeline (ctrlora.sampling) and `ctrlora generate`, on tiny random models built here.

The batched ControlNet forward (N conditions x the CFG pair, per-sample adapters) is checked
against separate passes with each adapter switched in; the zero-initialised ControlNet against
diffusers' own StableDiffusionPipeline on the same backbone."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ctrlora.models import adapters  # noqa: E402
from ctrlora.models.backbone import TinyBackboneConfig, build_tiny_backbone  # noqa: E402
from ctrlora.models.controlnet import CtrLoRAControlNet  # noqa: E402
from ctrlora.sampling import SCHEDULERS, CtrLoRAPipeline, condition_to_tensor, make_scheduler  # noqa: E402

from _models_helpers import randomize_adapter, residuals, tiny_test_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16          # image side; VAE factor 2 -> 8x8 latents
TOL = 1e-5
VOCAB = ["a", "dental", "photo", "of", "upper", "lower", "molar", "teeth"]
FAST = dict(num_inference_steps=3, progress=False)


def _cfg() -> TinyBackboneConfig:
    return tiny_test_config(image_size=SIZE, vae_block_out_channels=(32, 32), unet_block_out_channels=(32, 32),
                            unet_attention_heads=(2, 2), unet_layers_per_block=1, text_layers=1,
                            vae_scaling_factor=0.5)


def _perturb_base_zero_convs(cn, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for zc in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
            for p in zc.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def backbone():
    return build_tiny_backbone(_cfg(), VOCAB)


@pytest.fixture(scope="module")
def pipe(backbone):
    """Base with non-zero zero convs (so base-only control does something) + two random adapters."""
    cn = CtrLoRAControlNet.from_unet(backbone.unet, vae_scale_factor=2)
    _perturb_base_zero_convs(cn, 1)
    torch.manual_seed(0)  # the LoRA A matrices start from torch's global RNG
    for i, name in enumerate(("lighting", "segmentation")):
        adapters.add_adapter(cn, name, rank=2)
        randomize_adapter(cn, name, seed=10 + i)
    adapters.set_adapter(cn, None)
    return CtrLoRAPipeline.from_components(backbone, cn)


def _images(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _tol(*expected: torch.Tensor) -> float:
    """TOL relative to the largest expected value (at least 1): batched and separate passes
    differ by fp32 round-off, which grows with the magnitude of what they compute."""
    return TOL * max(1.0, *(float(e.abs().max()) for e in expected))


# ---------------------------------------------------------------------- batched == separate
def test_batched_residuals_equal_separate_passes(pipe):
    """One forward over 3 conditions x (CFG pair x 2 images) == 3 forwards, adapter switched in."""
    cn = pipe.controlnet
    names, weights = ["lighting", "segmentation", adapters.BASE_NAME], [1.0, 0.5, 0.3]
    g = torch.Generator().manual_seed(0)
    m = 4  # uncond x 2 + cond x 2
    cond = torch.randn(3, m, 4, SIZE // 2, SIZE // 2, generator=g)
    text = torch.randn(m, pipe.tokenizer.model_max_length, 64, generator=g)
    t = torch.tensor(500)
    with torch.no_grad():
        down, mid = pipe.control_residuals(cond, t, text, names, weights, control_strength=0.8)
        singles = []
        for i, name in enumerate(names):
            adapters.set_adapter(cn, name)
            singles.append(residuals(cn(cond[i], t, text, conditioning_scale=0.8)))
        adapters.set_adapter(cn, None)
    expected = [sum(w * s[k] for w, s in zip(weights, singles)) for k in range(len(singles[0]))]
    diff = _max_diff(list(down) + [mid], expected)
    print(f"batched vs separate residuals: max abs diff {diff:.3g}")
    assert diff <= _tol(*expected)
    # the check has teeth: the three conditions give clearly different residuals
    assert _max_diff(singles[0], singles[1]) > 1e-2 and _max_diff(singles[0], singles[2]) > 1e-2
    assert float(mid.abs().max()) > 1e-2


def test_batched_run_equals_separate_run(pipe):
    conds = {"lighting": (_images(1), 1.0), "segmentation": (_images(2)[0], 0.5)}
    common = dict(conditions=conds, seed=3, output_type="latent", **FAST)
    batched = pipe(["a dental photo", "upper molar"], **common).images
    separate = pipe(["a dental photo", "upper molar"], batch_conditions=False, **common).images
    diff = float((batched - separate).abs().max())
    print(f"batched vs separate final latents: max abs diff {diff:.3g}")
    assert diff <= _tol(separate)
    plain = pipe(["a dental photo", "upper molar"], conditions={}, seed=3, output_type="latent", **FAST).images
    assert float((batched - plain).abs().max()) > 1e-3  # the conditions do act


# ---------------------------------------------------------------------- weights
def test_weights_and_strength_scale_linearly(pipe):
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(2, 2, 4, SIZE // 2, SIZE // 2, generator=g)
    text = torch.randn(2, pipe.tokenizer.model_max_length, 64, generator=g)
    t = torch.tensor(300)
    names = ["lighting", "segmentation"]
    with torch.no_grad():
        one = pipe.control_residuals(cond, t, text, names, [1.0, 0.0])
        two = pipe.control_residuals(cond, t, text, names, [0.0, 1.0])
        mix = pipe.control_residuals(cond, t, text, names, [0.7, 0.3])
        dbl = pipe.control_residuals(cond, t, text, names, [1.4, 0.6])
        half = pipe.control_residuals(cond, t, text, names, [0.7, 0.3], control_strength=0.5)
    flat = lambda r: list(r[0]) + [r[1]]  # noqa: E731
    assert _max_diff(flat(mix), [0.7 * a + 0.3 * b for a, b in zip(flat(one), flat(two))]) <= TOL
    assert _max_diff(flat(dbl), [2 * x for x in flat(mix)]) <= TOL
    assert _max_diff(flat(half), [0.5 * x for x in flat(mix)]) <= TOL
    assert _max_diff(flat(one), flat(two)) > 1e-2


# ---------------------------------------------------------------------- zero ControlNet
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_zero_controlnet_equals_plain_backbone(backbone, scheduler):
    """Fresh zero convs: with a condition (and a random LoRA) the images equal diffusers'
    StableDiffusionPipeline on the same backbone, scheduler and seed; so does conditions={}."""
    from diffusers import StableDiffusionPipeline

    cn = CtrLoRAControlNet.from_unet(backbone.unet, vae_scale_factor=2)
    adapters.add_adapter(cn, "lighting", rank=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for k, t in adapters.adapter_tensor_refs(cn, "lighting").items():
            if ".lora_" in k:
                t.add_(0.5 * torch.randn(t.shape, generator=g))
    pipe = CtrLoRAPipeline.from_components(backbone, cn)
    prompt = "a photo of lower teeth"
    ours = pipe(prompt, {"lighting": (_images(3, 1), 1.0)}, scheduler=scheduler, seed=11, output_type="np",
                **FAST).images
    none = pipe(prompt, {}, scheduler=scheduler, seed=11, output_type="np", **FAST).images
    sd = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                 unet=backbone.unet, scheduler=pipe.make_scheduler(scheduler), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ref = sd(prompt, height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=7.5,
             generator=torch.Generator().manual_seed(11), output_type="np").images
    assert ours.shape == ref.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(none - ref).max() <= TOL


# ---------------------------------------------------------------------- seeds, schedulers, outputs
def test_seed_reproducibility_and_batch_independence(pipe):
    conds = {"lighting": (_images(4), 1.0)}
    a = pipe(["a", "b"], conds, seed=1, output_type="pt", **FAST).images
    b = pipe(["a", "b"], conds, seed=1, output_type="pt", **FAST).images
    c = pipe(["a", "b"], conds, seed=2, output_type="pt", **FAST).images
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-3
    # one seed per image: image 1 of the batch equals that image generated alone
    pair = pipe(["a", "b"], conds, seed=[5, 6], output_type="latent", **FAST).images
    alone = pipe("b", {"lighting": (_images(4)[1:], 1.0)}, seed=[6], output_type="latent", **FAST).images
    # equal up to batch-size-dependent kernel rounding, which CFG at 7.5 amplifies every step
    # (latents of size ~10 here); another seed differs by O(1)
    assert torch.allclose(pair[1:], alone, rtol=1e-4, atol=1e-3)
    other = pipe("b", {"lighting": (_images(4)[1:], 1.0)}, seed=[5], output_type="latent", **FAST).images
    assert float((other - alone).abs().max()) > 0.1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedulers_and_output_types(pipe, scheduler):
    conds = {"segmentation": (Image.fromarray((_images(6, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)),
                              1.0)}
    pil = pipe("upper molar", conds, scheduler=scheduler, seed=0, **FAST).images
    assert isinstance(pil, list) and len(pil) == 1 and pil[0].size == (SIZE, SIZE) and pil[0].mode == "RGB"
    arr = pipe("upper molar", conds, scheduler=scheduler, seed=0, output_type="np", **FAST).images
    assert arr.shape == (1, SIZE, SIZE, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    pt = pipe("upper molar", conds, scheduler=scheduler, seed=0, output_type="pt", return_dict=False,
              **FAST)[0]
    assert pt.shape == (1, 3, SIZE, SIZE) and np.abs(pt.permute(0, 2, 3, 1).numpy() - arr).max() <= 1e-6
    lat = pipe("upper molar", conds, scheduler=scheduler, seed=0, output_type="latent", num_images_per_prompt=2,
               **FAST).images
    assert lat.shape == (2, 4, SIZE // 2, SIZE // 2) and torch.isfinite(lat).all()


def test_schedulers_differ_and_eta_draws_noise(pipe):
    conds = {"lighting": (_images(8, 1), 1.0)}
    out = {name: pipe("a", conds, seed=0, scheduler=name, output_type="latent", **FAST).images for name in SCHEDULERS}
    eta = pipe("a", conds, seed=0, eta=1.0, output_type="latent", **FAST).images
    for i, a in enumerate(SCHEDULERS):
        for b in SCHEDULERS[i + 1:]:
            assert float((out[a] - out[b]).abs().max()) > 1e-4, (a, b)
    assert float((out["ddim"] - eta).abs().max()) > 1e-4


def test_schedulers_built_from_the_backbone_config(backbone):
    """Every named sampler keeps the backbone's noise schedule and prediction type; the
    Karras variant spaces its sigmas differently; an unknown name is refused by name."""
    base = backbone.scheduler
    built = {name: make_scheduler(base.config, name) for name in SCHEDULERS}
    assert [type(s).__name__ for s in built.values()] == ["DDIMScheduler", "DPMSolverMultistepScheduler",
                                                          "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
    for name, sched in built.items():
        assert torch.equal(sched.betas, base.betas), name
        assert sched.config.prediction_type == base.config.prediction_type, name
    assert built["dpm_karras"].config.use_karras_sigmas and not built["dpm"].config.use_karras_sigmas
    assert built["dpm"].config.algorithm_type == built["dpm_karras"].config.algorithm_type == "dpmsolver++"
    for sched in built.values():
        sched.set_timesteps(8)
    assert not torch.equal(built["dpm"].timesteps, built["dpm_karras"].timesteps)
    with pytest.raises(ValueError, match="'euler'"):
        make_scheduler(base.config, "euler")


def test_fast_samplers_solve_the_same_ode_as_ddim(pipe):
    """DDIM (eta 0), DPM-Solver++ 2M (uniform or Karras sigmas) and UniPC discretise one
    probability-flow ODE: at 50 steps they land within 15 % (of the latents' largest value) of
    DDIM; at 6 steps they differ by more than the latents' size. What is left at 50 steps is
    mostly where each starts: the backbone's "leading" spacing puts DDIM's first step at t=981,
    DPM-Solver's and UniPC's at t=951, Karras' at t=999 (measured 11 %; 5 % at 100
    steps). A wrong prediction type or noise schedule would be off by O(1)."""
    conds = {"lighting": (_images(9, 1), 1.0)}
    common = dict(conditions=conds, seed=4, guidance_scale=1.0, output_type="latent", progress=False)
    for steps, check in ((50, lambda rel: rel <= 0.15), (6, lambda rel: rel > 0.5)):
        ref = pipe("a", scheduler="ddim", num_inference_steps=steps, **common).images
        for name in SCHEDULERS[1:]:
            got = pipe("a", scheduler=name, num_inference_steps=steps, **common).images
            rel = float((got - ref).abs().max()) / float(ref.abs().max())
            print(f"{name} vs ddim at {steps} steps: max rel diff {rel:.3g}")
            assert check(rel), (name, steps, rel)


# ---------------------------------------------------------------------- conditions
def test_base_only_and_no_condition(pipe):
    img = _images(9, 1)
    base = pipe("a", {adapters.BASE_NAME: (img, 1.0)}, seed=0, output_type="latent", **FAST).images
    labelled = pipe("a", {"x": (img, 1.0, adapters.BASE_NAME)}, seed=0, output_type="latent", **FAST).images
    assert torch.equal(base, labelled)
    lit = pipe("a", {"lighting": (img, 1.0)}, seed=0, output_type="latent", **FAST).images
    plain = pipe("a", {}, seed=0, output_type="latent", **FAST).images
    assert float((base - lit).abs().max()) > 1e-3 and float((base - plain).abs().max()) > 1e-3
    # two base-only conditions under their own labels, weights summing
    two = pipe("a", {"x": (img, 0.5, adapters.BASE_NAME), "y": (img, 0.5, adapters.BASE_NAME)}, seed=0, output_type="latent",
               **FAST).images
    assert torch.isfinite(two).all()


def test_unknown_condition_and_bad_inputs(pipe):
    with pytest.raises(KeyError, match=r"unknown condition 'depth'.*lighting.*segmentation"):
        pipe("a", {"depth": (_images(0, 1), 1.0)}, **FAST)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe("a", {"lighting": (_images(0, 1) * 2 - 1, 1.0)}, **FAST)
    with pytest.raises(ValueError, match="batch sizes"):
        pipe(["a", "b", "c"], {"lighting": (_images(0, 2), 1.0)}, **FAST)
    with pytest.raises(ValueError, match="scheduler"):
        pipe("a", {}, scheduler="euler", **FAST)


def test_condition_input_forms_agree():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    ref = torch.from_numpy(u8.astype(np.float32) / 255).permute(2, 0, 1)[None]
    for form in (Image.fromarray(u8), u8, u8.astype(np.float32) / 255, ref[0], ref, [Image.fromarray(u8)]):
        assert torch.allclose(condition_to_tensor(form), ref, atol=1e-7), type(form)
    gray = condition_to_tensor(Image.fromarray(u8[..., 0]))
    assert gray.shape == (1, 3, SIZE, SIZE) and torch.equal(gray[:, 0], gray[:, 2])


def test_cnn_ablation_runs_batched_equals_separate(backbone):
    cn = CtrLoRAControlNet.from_unet(backbone.unet, condition_embedding="cnn", vae_scale_factor=2)
    _perturb_base_zero_convs(cn, 2)
    adapters.add_adapter(cn, "lighting", rank=2)
    randomize_adapter(cn, "lighting", seed=3)
    pipe = CtrLoRAPipeline.from_components(backbone, cn)
    conds = {"lighting": (_images(10), 1.0), adapters.BASE_NAME: (_images(11), 0.5)}
    a = pipe(["a", "b"], conds, seed=0, output_type="latent", **FAST).images
    b = pipe(["a", "b"], conds, seed=0, output_type="latent", batch_conditions=False, **FAST).images
    plain = pipe(["a", "b"], {}, seed=0, output_type="latent", **FAST).images
    assert float((a - b).abs().max()) <= _tol(b)
    assert float((a - plain).abs().max()) > 1e-3


# ---------------------------------------------------------------------- saved parts + CLI
@pytest.fixture(scope="module")
def saved_parts(tmp_path_factory, backbone):
    root = tmp_path_factory.mktemp("parts")
    backbone.save(root / "backbone")
    cn = CtrLoRAControlNet.from_unet(backbone.unet, vae_scale_factor=2)
    _perturb_base_zero_convs(cn, 4)
    cn.save_pretrained(root / "base")
    h = adapters.base_hash(cn)
    for i, name in enumerate(("lighting", "segmentation")):
        adapters.add_adapter(cn, name, rank=2)
        randomize_adapter(cn, name, seed=20 + i)
        adapters.save_adapter(cn, name, root / "adapters" / name, base_hash=h)
    other = CtrLoRAControlNet.from_unet(backbone.unet, vae_scale_factor=2)  # another base (zero convs)
    adapters.add_adapter(other, "lighting", rank=2)
    adapters.save_adapter(other, "lighting", root / "foreign" / "lighting", base_hash=adapters.base_hash(other))
    for i, name in enumerate(("lighting", "segmentation")):
        Image.fromarray((np.random.default_rng(i).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(
            root / f"{name}.png")
    return root, cn


def test_from_pretrained_parts_matches_in_memory(saved_parts):
    root, cn = saved_parts
    loaded = CtrLoRAPipeline.from_pretrained_parts(
        root / "backbone", root / "base",
        {"lighting": root / "adapters" / "lighting", "segmentation": root / "adapters" / "segmentation"})
    assert loaded.adapter_names == ["lighting", "segmentation"]
    from ctrlora.models.backbone import load_backbone

    mem = CtrLoRAPipeline.from_components(load_backbone(root / "backbone"), cn)
    conds = {"lighting": (Image.open(root / "lighting.png"), 1.0),
             "segmentation": (Image.open(root / "segmentation.png"), 0.5)}
    x = loaded("a dental photo", conds, seed=0, output_type="latent", **FAST).images
    y = mem("a dental photo", conds, seed=0, output_type="latent", **FAST).images
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="trained on base"):
        CtrLoRAPipeline.from_pretrained_parts(root / "backbone", root / "base",
                                              {"lighting": root / "foreign" / "lighting"})
    with pytest.raises(ValueError, match="condition 'segmentation'"):
        CtrLoRAPipeline.from_pretrained_parts(root / "backbone", root / "base",
                                              {"lighting": root / "adapters" / "segmentation"})
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        CtrLoRAPipeline.from_pretrained_parts(root / "backbone", root / "base", {"lighting": root / "nowhere"})


def test_generate_cli_writes_pngs(saved_parts, tmp_path, capsys):
    from ctrlora.cli import main

    root, _ = saved_parts
    out = tmp_path / "out"
    argv = ["generate", "--backbone", str(root / "backbone"), "--base", str(root / "base"),
            "--adapter", f"lighting={root / 'adapters' / 'lighting'}:1.0",
            "--adapter", f"segmentation={root / 'adapters' / 'segmentation'}:0.5",
            "--condition", f"lighting={root / 'lighting.png'}",
            "--condition", f"segmentation={root / 'segmentation.png'}",
            "--prompt", "a dental photo", "--steps", "2", "--seed", "3", "--num-images", "2",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted(out.glob("*.png"))
    assert [str(p) for p in pngs] == printed and len(pngs) == 2
    assert all(Image.open(p).size == (SIZE, SIZE) for p in pngs)
    assert (out / "generate.json").is_file()
    # image i uses seed + i: rerunning with --num-images 1 --seed 4 reproduces image 1
    out2 = tmp_path / "out2"
    argv2 = [a if a != str(out) else str(out2) for a in argv]
    argv2[argv2.index("--seed") + 1], argv2[argv2.index("--num-images") + 1] = "4", "1"
    assert main(argv2) == 0
    capsys.readouterr()
    a = np.asarray(Image.open(pngs[1])).astype(int)
    b = np.asarray(Image.open(next(out2.glob("*.png")))).astype(int)
    assert np.abs(a - b).max() <= 1


def test_generate_cli_errors(saved_parts, tmp_path, capsys):
    from ctrlora.cli import main

    root, _ = saved_parts
    head = ["generate", "--backbone", str(root / "backbone"), "--base", str(root / "base"),
            "--steps", "1", "--out", str(tmp_path / "o"), "--device", "cpu"]
    light = ["--adapter", f"lighting={root / 'adapters' / 'lighting'}"]
    cases = [
        (light + ["--condition", f"lighting={root / 'lighting.png'}", "--condition", f"depth={root / 'lighting.png'}"],
         "unknown condition(s) ['depth']"),
        (light + ["--condition", f"lighting={tmp_path / 'missing.png'}"], "does not exist"),
        (["--adapter", f"lighting={tmp_path / 'nope'}", "--condition", f"lighting={root / 'lighting.png'}"],
         "does not exist"),
        (["--adapter", f"lighting={root / 'foreign' / 'lighting'}", "--condition", f"lighting={root / 'lighting.png'}"],
         "trained on base"),
        (light, "have no --condition image"),
    ]
    for extra, message in cases:
        assert main(head + extra) == 2, extra
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "o").exists()


def test_ops_generate_with_registry_uri(saved_parts, tmp_path, monkeypatch, capsys):
    """`ctrlora-ops generate --adapter NAME=models:/ctrlora-<c>@champion:W` brings backbone and
    base from the registry and generates what `ctrlora generate` does from the same folders."""
    pytest.importorskip("mlflow")
    import json

    from ctrlora.cli import main as library_main

    root, cn = saved_parts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-generate")
    from pipelines.cli import main as ops_main
    from pipelines.registry.registration import register_adapter

    res = register_adapter(
        "lighting", root / "adapters" / "lighting", dataset_hash="f" * 32 + ".dir",
        base_hash=adapters.read_adapter_config(root / "adapters" / "lighting")["base_hash"],
        backbone_dir=root / "backbone", base_dir=root / "base", metrics={"fidelity": 0.1}, git_commit="c0ffee")
    assert res.decision == "champion"
    common = ["--condition", f"lighting={root / 'lighting.png'}", "--steps", "2", "--seed", "1", "--device", "cpu"]
    uri = "models:/ctrlora-lighting@champion"
    assert ops_main(["generate", "--adapter", f"lighting={uri}:0.7", "--out", str(tmp_path / "a")]
                    + common) == 0
    assert library_main(["generate", "--backbone", str(root / "backbone"), "--base", str(root / "base"),
                         "--adapter", f"lighting={root / 'adapters' / 'lighting'}:0.7",
                         "--out", str(tmp_path / "b")] + common) == 0
    via_uri, local = (next((tmp_path / d).glob("*.png")) for d in "ab")
    assert np.array_equal(np.asarray(Image.open(via_uri)), np.asarray(Image.open(local)))
    record = json.loads((tmp_path / "a" / "generate.json").read_text())
    assert record["adapters"] == {"lighting": uri} and record["base"] == f"from {uri}"
    capsys.readouterr()
    assert ops_main(["generate", "--adapter", "lighting=models:/ctrlora-lighting@nope",
                     "--out", str(tmp_path / "c")] + common) == 2
    assert "no alias 'nope'" in capsys.readouterr().err
    # the library takes folders only: a registry URI is not a folder
    with pytest.raises(SystemExit):  # --backbone / --base are required
        library_main(["generate", "--adapter", f"lighting={uri}", "--out", str(tmp_path / "d")] + common)
    assert library_main(["generate", "--backbone", str(root / "backbone"), "--base", str(root / "base"),
                         "--adapter", f"lighting={uri}", "--out", str(tmp_path / "d")] + common) == 2
    assert "does not exist" in capsys.readouterr().err
