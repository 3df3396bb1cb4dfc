"""``train_base.source: imported`` at toy scale: a tiny backbone built from config, rendered +
prepared scans at 32 px, an embed cache; a perturbed base exported to the published layout with
``ctrlora export``'s library function, then the train_base stage entry run in-process on it (and,
for contrast, in trained mode) with a couple of steps."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _models_helpers import perturb, tiny_eval_backbone  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

SIZE = 32
CONDITIONS = ["segmentation", "canny"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ctrlora.data.contract import ContractConfig
    from ctrlora.data.prepare import PrepareConfig, prepare
    from ctrlora.data.render import DatasetConfig, render_dataset
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.convert import run_export
    from ctrlora.models.backbone import backbone_hash
    from ctrlora.training.embed import save_embed_cache
    from ctrlora.training.embed_update import save_keys, update_embed_cache

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("imported")
    data = root / "data"
    render_dataset(DatasetConfig(out=data / "rendered", n=16, seed=3, resolution=SIZE, workers=1, progress=False))
    prepare(PrepareConfig(sources=(data / "rendered",), out=data / "prepared", data_root=data, test_fraction=0.25,
                          validation_fraction=0.0, conditions=tuple(CONDITIONS),
                          contract=ContractConfig(resolution=SIZE), workers=1, progress=False))
    torch.manual_seed(0)
    bb = tiny_eval_backbone(SIZE)
    bb.save(root / "backbone")
    # the cache and its rows' content keys, as the embed stage writes them (train_base reads its
    # rows through the base_pairs record, which names them by these keys)
    cache, keys, _ = update_embed_cache(bb.vae, bb.text_encoder, bb.tokenizer, data / "prepared", CONDITIONS,
                                        backbone_hash(root / "backbone"), progress=False)
    save_embed_cache(cache, data / "embed")
    save_keys(keys, data / "embed", data / "embed_keys.json")
    # the "published" base: perturbed (not the UNet's copy, non-zero zero convs), exported
    src = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae")
    perturb(src, 7)
    src.save_pretrained(root / "src_base")
    run_export(argparse.Namespace(base=root / "src_base", adapter=[], out=root / "published", format="safetensors",
                                  stale_rank=2))
    return {"root": root, "data": data, "published": root / "published"}


def _params(world, name: str, **train_base) -> Path:
    root, data = world["root"], world["data"]
    run = root / name
    params = {
        # every key the stage reads (it has no second defaults), params.yaml's values, then the case's
        "train_base": {"conditions": CONDITIONS, "rank": 2, "prompt_dropout": 0.3, "condition_shares": {},
                       "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "log_every": 1, "seed": 0},
                       "source": "trained", "imported": None, "imported_max_pairs": None, **train_base},
        # absolute paths: the stages resolve `paths` against the repo root, which leaves these as they are
        "base_refresh": {"growth": 0.1},
        "paths": {"backbone": str(root / "backbone"), "embed": str(data / "embed"), "base": str(run / "base"),
                  "embed_keys": str(data / "embed_keys.json"), "base_pairs": str(run / "base_pairs.json"),
                  "reports": {"train_base": str(run / "reports")}},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run_stage(monkeypatch, params: Path) -> int:
    from pipelines.stages import base_pairs, train_base

    monkeypatch.setenv("CTRLORA_PARAMS", str(params))
    assert base_pairs.main() == 0  # the record of the whole training split, as a fresh build makes
    return train_base.main()


@pytest.fixture(scope="module")
def imported_run(world):
    mp = pytest.MonkeyPatch()
    ckpt = world["published"] / "base.safetensors"
    params = _params(world, "imp", source="imported", imported=str(ckpt))
    try:
        assert _run_stage(mp, params) == 0
    finally:
        mp.undo()
    return {**world, "base": world["root"] / "imp" / "base", "ckpt": ckpt}


def test_imported_base_equals_what_ctrlora_convert_gives(imported_run, tmp_path):
    from ctrlora.models.convert import run

    back = tmp_path / "back"
    run(argparse.Namespace(base=imported_run["ckpt"], adapter=[], name=[], out=back,
                           ldm_config=imported_run["published"] / "ldm_config.json"))
    want = load_file(str(back / "base" / WEIGHTS))
    got = load_file(str(imported_run["base"] / WEIGHTS))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # ... and it is the perturbed source, not the backbone's UNet copy
    src = load_file(str(imported_run["root"] / "src_base" / WEIGHTS))
    assert all(torch.equal(got[k], src[k]) for k in src)


def test_base_frozen_while_each_adapter_trained(imported_run):
    from ctrlora.models import adapters as A
    from ctrlora.models.controlnet import CtrLoRAControlNet

    base = CtrLoRAControlNet.from_pretrained(imported_run["base"])
    bh = A.base_hash(base)
    src = CtrLoRAControlNet.from_pretrained(imported_run["root"] / "src_base")
    assert bh == A.base_hash(src)  # the stored base is the imported one, untouched by training
    base_sd = A.base_state_dict(base)
    for c in CONDITIONS:
        folder = imported_run["base"] / "adapters" / c
        cfg = A.read_adapter_config(folder)
        assert cfg["condition"] == c and cfg["base_hash"] == bh and cfg["rank"] == 2
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        lora_b = [t for k, t in tensors.items() if k.endswith("lora_B.weight")]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b), c  # B starts at zero: it trained
        own = {k: t for k, t in tensors.items() if "lora_" not in k}
        assert own and any(not torch.equal(t, base_sd[k]) for k, t in own.items() if k in base_sd), c
        A.load_adapter(base, folder)  # loads on the imported base (its hash checks)
    loss = (imported_run["root"] / "imp" / "reports" / "loss.csv").read_text().splitlines()
    assert loss[0] == "step,loss," + ",".join(f"loss_{c}" for c in CONDITIONS) and len(loss) == 1 + 2 * len(CONDITIONS)


def test_base_source_records_the_checksum(imported_run):
    rec = json.loads((imported_run["base"] / "base_source.json").read_text())
    assert rec["source"] == "imported"
    assert rec["checkpoint_sha256"] == hashlib.sha256(imported_run["ckpt"].read_bytes()).hexdigest()
    assert rec["checkpoint_format"] == "safetensors" and rec["discarded_stale_lora_keys"] > 0
    text = json.dumps(rec)
    assert str(imported_run["root"]) not in text and "base.safetensors" not in text  # nothing machine-specific


def test_missing_or_malformed_checkpoint_names_the_setting(world, monkeypatch, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"train_base\.imported.*nope\.safetensors"):
        _run_stage(monkeypatch, _params(world, "missing", source="imported", imported=str(missing)))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"train_base\.imported.*bad\.safetensors"):
        _run_stage(monkeypatch, _params(world, "bad", source="imported", imported=str(bad)))
    with pytest.raises(ValueError, match=r"train_base\.imported is not set"):
        _run_stage(monkeypatch, _params(world, "unset", source="imported"))
    with pytest.raises(ValueError, match=r"train_base\.source"):
        _run_stage(monkeypatch, _params(world, "typo", source="imprted"))
    for name in ("missing", "bad", "unset", "typo"):
        assert not (world["root"] / name / "base").exists()


def test_trained_mode_still_trains_the_base(world, monkeypatch):
    from ctrlora.models import adapters as A
    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet

    assert _run_stage(monkeypatch, _params(world, "trn", source="trained",
                                           imported=str(world["published"] / "base.safetensors"))) == 0
    out = world["root"] / "trn" / "base"
    assert not (out / "base_source.json").exists()
    copy = CtrLoRAControlNet.from_unet(load_backbone(world["root"] / "backbone").unet, condition_embedding="vae")
    got, want = A.base_state_dict(CtrLoRAControlNet.from_pretrained(out)), A.base_state_dict(copy)
    assert any(not torch.equal(got[k], want[k]) for k in want)  # the base itself trained
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(CONDITIONS)
