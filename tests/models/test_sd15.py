"""The SD 1.5 path, end to end on a CPU with random weights (marker ``sd15``; ``make test-sd15``).

A random-weight SD 1.5 backbone (the real UNet, VAE and CLIP text-encoder shapes, from the configs
in :mod:`ctrlora.models.sizes`) is written in the diffusers layout to a temp folder. A temp copy
of the project's code then runs the real DVC stage entries on it with ``backbone.preset: sd15``
pointing there ($CTRLORA_PARAMS names the params file): render and prepare a few scans at 64 px,
record the backbone, embed, two base steps (with the ``16gb_no_bnb`` memory preset: bf16
autocast, checkpointing, frozen UNet in bf16) and two steps of a rank-128 adapter (fp32, the
default options). Then: the adapter's size (36.95 M), save/load, a published-layout (ldm) export
of the trained base and adapter converted back by ``ctrlora convert``, and one sampling step of
``ctrlora generate`` with two conditions. Each stage runs in its own process, as under DVC.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _models_helpers import REF

# minutes on a shared 2-core CPU: each stage loads 1.2 G weights and the trainers checkpoint them
pytestmark = [pytest.mark.sd15, pytest.mark.timeout(2400), pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
BASE_CONDITIONS = ["segmentation", "depth"]
NEW = "lighting"
RANK = 128
# the stage entries pipelines.stages.<entry> (the stage `backbone` runs record_backbone)
STAGES = ["render", "prepare", "record_backbone", "embed", "base_pairs", "train_base", ["train_adapter", NEW]]


def _params(sd15_dir: Path) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["render"].update(n=10, workers=1, resolution=64)
    p["prepare"].update(resolution=64, test_fraction=0.2, validation_fraction=0.1, workers=1,
                        conditions=[*BASE_CONDITIONS, NEW])
    p["backbone"].update(preset="sd15", sd15_path=str(sd15_dir))
    p["embed"]["batch_size"] = 4
    steps = {"max_steps": 2, "batch_size": 1, "checkpoint_every": 0, "log_every": 1, "warmup_steps": 0}
    p["train_base"].update(conditions=BASE_CONDITIONS, condition_shares={}, rank=8)
    p["train_base"]["train"] = {**p["train_base"]["train"], **steps, "memory_preset": "16gb_no_bnb"}
    p["train_adapter"].update(conditions=[NEW], rank=RANK, max_pairs=None)
    p["train_adapter"]["train"] = {**p["train_adapter"]["train"], **steps}
    return p


def _stage(root: Path, params: Path, stage) -> subprocess.CompletedProcess:
    name, *args = [stage] if isinstance(stage, str) else stage
    env = dict(os.environ, CTRLORA_PARAMS=str(params), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", f"pipelines.stages.{name}", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(project root, random SD 1.5 dir) after every stage ran."""
    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.sizes import random_sd15_backbone

    tmp = tmp_path_factory.mktemp("sd15")
    sd15 = random_sd15_backbone(CAPTION_VOCABULARY).save(tmp / "sd15")
    root = tmp / "project"
    for pkg in ("ctrlora", "pipelines"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = tmp / "params.yaml"
    (root / "params.yaml").write_text(yaml.safe_dump(_params(sd15), sort_keys=False))
    shutil.copy(root / "params.yaml", params)
    for stage in STAGES:
        _stage(root, params, stage)
    times = [json.loads(line) for line in (root / "logs" / "stage_times.jsonl").read_text().splitlines()]
    print("stage seconds:", {t["stage"]: t["seconds"] for t in times})
    yield root, sd15
    # gigabytes of random weights: not left for pytest's retention of old temp dirs
    shutil.rmtree(tmp, ignore_errors=True)


def test_stages_record_sd15_and_embed_its_shapes(project):
    root, sd15 = project
    record = json.loads((root / "models" / "backbone" / "backbone.json").read_text())
    assert record["preset"] == "sd15" and record["path"] == str(sd15.resolve())
    from ctrlora.training.embed import load_embed_cache

    cache = load_embed_cache(root / "data" / "embed", [*BASE_CONDITIONS, NEW])
    assert tuple(cache.photo_mean.shape[1:]) == (4, 8, 8)  # 64 px / the VAE's factor 8
    assert tuple(cache.text.shape[1:]) == (77, 768)
    assert len(cache.scan_ids) >= 4


def test_adapter_size_and_round_trip(project):
    from ctrlora.models import adapters
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.sizes import compute_sizes

    root, _ = project
    out = root / "models" / "adapters" / NEW
    cfg = adapters.read_adapter_config(out)
    assert cfg["rank"] == RANK and cfg["base_hash"] == adapters.base_hash(
        CtrLoRAControlNet.from_pretrained(root / "models" / "base"))
    assert cfg["num_params"] == compute_sizes("sd15", RANK)["adapter"]["params"]
    assert round(cfg["num_params"] / 1e6, 2) == 36.95
    # the trainer changed it: its LoRA up-projections start at zero
    model = CtrLoRAControlNet.from_pretrained(root / "models" / "base")
    adapters.load_adapter(model, out)
    saved = adapters.adapter_state_dict(model, NEW)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
    adapters.save_adapter(model, NEW, root / "again", base_hash=cfg["base_hash"])
    model2 = CtrLoRAControlNet.from_pretrained(root / "models" / "base")
    adapters.load_adapter(model2, root / "again")
    again = adapters.adapter_state_dict(model2, NEW)
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def test_published_layout_converts_back(project, tmp_path, capsys):
    """The trained base and adapter written in the published ldm layout (SD 1.5 key list of the
    reference fixture, a stale LoRA set in the base file) convert back to the same tensors."""
    from safetensors.torch import save_file

    from ctrlora.cli import main
    from ctrlora.models import adapters, convert
    from ctrlora.models.controlnet import CtrLoRAControlNet

    root, _ = project
    keys = json.loads((REF / "sd15_keys.json").read_text())
    model = CtrLoRAControlNet.from_pretrained(root / "models" / "base")
    base = adapters.base_state_dict(model)
    g = torch.Generator().manual_seed(0)
    stale = {k: torch.randn(tuple(s), generator=g) * 0.01 for k, s in adapters.adapter_layout(model, RANK).items()
             if ".lora_" in k}
    save_file(convert.diffusers_to_ldm(base, stale, 2, list(keys["base_file"])), str(tmp_path / "base.safetensors"))
    adapters.load_adapter(model, root / "models" / "adapters" / NEW)
    trained = adapters.adapter_state_dict(model, NEW)
    plain = {k: v for k, v in trained.items() if ".lora_" not in k}
    lora = {k: v for k, v in trained.items() if ".lora_" in k}
    save_file(convert.diffusers_to_ldm(plain, lora, 2, list(keys["adapter_file"])), str(tmp_path / "ad.safetensors"))
    del model

    out = tmp_path / "converted"
    assert main(["convert", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "ad.safetensors"),
                 "--name", NEW, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["discarded_stale_lora_keys"] == 164 and report["adapters"][NEW]["rank"] == RANK
    back = CtrLoRAControlNet.from_pretrained(out / "base")
    assert all(torch.equal(v, base[k]) for k, v in adapters.base_state_dict(back).items())
    adapters.load_adapter(back, out / "adapters" / NEW)
    got = adapters.adapter_state_dict(back, NEW)
    assert set(got) == set(trained) and all(torch.equal(got[k], trained[k]) for k in trained)


def test_one_sampling_step_with_two_conditions(project, tmp_path):
    root, sd15 = project
    cond = root / "data" / "prepared" / "conditions"
    first = {c: sorted((cond / c).rglob("*.png"))[0] for c in ("segmentation", NEW)}
    argv = [sys.executable, "-m", "ctrlora.cli", "generate", "--backbone", str(sd15), "--base", str(root / "models" / "base"),
            "--adapter", f"segmentation={root / 'models' / 'base' / 'adapters' / 'segmentation'}",
            "--adapter", f"{NEW}={root / 'models' / 'adapters' / NEW}:0.5",
            "--condition", f"segmentation={first['segmentation']}", "--condition", f"{NEW}={first[NEW]}",
            "--prompt", "upper jaw molar", "--steps", "1", "--guidance", "7.5", "--device", "cpu",
            "--out", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from PIL import Image

    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (64, 64)
    record = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert record["conditions"][NEW]["weight"] == 0.5 and set(record["conditions"]) == {"segmentation", NEW}
