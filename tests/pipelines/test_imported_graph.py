"""The production graph in imported-base mode, through ``make repro``'s own command, at toy scale.

A copy of this repository (tracked files, a fresh git repo, as test_e2e makes it) at test_e2e's
size (a dozen 64 px scans, a few steps) reads the foundation's tiny backbone. A "published" base
is made for that backbone: a ControlNet copied from its UNet, every tensor perturbed (so it is
neither the UNet's copy nor zero-conv'd), written in the published layout as ``.ckpt`` by
``ctrlora export``'s function (with a stale LoRA set, as the paper's base file has) into the toy's
git-ignored ``checkpoints/``. params.yaml says ``train_base.source: imported`` with that relative
path. Then ``python -m pipelines.orchestration.repro`` runs ``dvc repro`` over every stage of the
real ``dvc.yaml``, registration into a sqlite MLflow store and the README report. Checked:

* every stage ran;
* ``models/base`` is the imported base: its tensors equal the checkpoint's after conversion (and
  the exported source's), ``base_source.json`` records the checkpoint's sha256 and format;
* every base condition's and every new condition's adapter trained (LoRA B left zero) on that
  frozen base (their configs carry its hash, they load on it);
* ``metrics/evaluate.json`` scores every condition;
* every registered version carries the imported base's hash, the dataset hash ``dvc.lock``
  records, ``base_source: imported`` with the checkpoint's sha256, and its model card says so;
  the champion's registered base part is the imported base.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from _project_helpers import repro, stages_ran, toy_project

pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[2]
BASE_CONDITIONS = ["segmentation", "canny"]   # a rendered map and one extracted from the photograph
NEW_CONDITIONS = ["lighting"]
CONDITIONS = BASE_CONDITIONS + NEW_CONDITIONS
CHECKPOINT = "checkpoints/published/base.ckpt"  # relative to the toy's root (git-ignored there)
STAGES = ["render", "prepare", "backbone", "embed", "base_pairs", "train_base",
          *[f"train_adapter@{c}" for c in NEW_CONDITIONS], "evaluate"]
WEIGHTS = "diffusion_pytorch_model.safetensors"

# the whole graph once, then three registrations: ~75 s on 2 cores shared with another test run
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _params() -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["render"].update(n=14, workers=1)
    p["prepare"].update(test_fraction=0.3, workers=1)
    p["embed"]["batch_size"] = 64
    steps = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0, "log_every": 1}
    p["train_base"].update(conditions=BASE_CONDITIONS, condition_shares={}, source="imported",
                           imported=CHECKPOINT, imported_max_pairs=None)
    p["train_base"]["train"].update(**steps)
    p["train_adapter"].update(conditions=NEW_CONDITIONS, max_pairs=None)
    p["train_adapter"]["train"].update(**steps)
    ev = p["evaluate"]
    ev.update(max_scans=3, grid_rows=2, guidance=[1.0], gate_guidance=1.0, bootstrap={"n_boot": 200, "seed": 0},
              condition_weights={c: w for c, w in ev["condition_weights"].items() if c in CONDITIONS},
              combined={c: w for c, w in ev["combined"].items() if c in CONDITIONS},
              workers=1, threads=1, progress=False)
    ev["sampling"].update(steps=2, batch_size=8)
    bench = p["register"]["benchmark"]
    bench.update(max_scans=8, grid_rows=2, bootstrap={"n_boot": 200, "seed": 0})
    bench["sampling"].update(steps=2, batch_size=8)
    p["flows"].update(retries=0, retry_delay_seconds=0)
    return p


def _env(db: Path, parts_cache: Path) -> dict[str, str]:
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                MLFLOW_TRACKING_URI=f"sqlite:///{db}", CTRLORA_PARTS_CACHE=str(parts_cache),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")


def _publish(root: Path, work: Path) -> Path:
    """A perturbed base for the toy's backbone, exported to the published layout at
    ``root / CHECKPOINT``; returns the source base folder (``save_pretrained``)."""
    import torch
    from _models_helpers import perturb

    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.convert import run_export

    torch.manual_seed(0)
    src = CtrLoRAControlNet.from_unet(load_backbone(root / "foundation/backbone").unet, condition_embedding="vae")
    perturb(src, 7, scale=0.02)
    src.save_pretrained(work / "src_base")
    out = (root / CHECKPOINT).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    run_export(argparse.Namespace(base=work / "src_base", adapter=[], out=out, format="ckpt", stale_rank=2))
    assert (root / CHECKPOINT).is_file()
    return work / "src_base"


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """The toy project after one ``make repro`` in imported mode."""
    tmp = tmp_path_factory.mktemp("imported_graph")
    root = toy_project(tmp / "project", _params(),
                       skip=lambda rel: rel == "dvc.lock" or rel.startswith(("tests/fixtures/", "frozen_benchmark/")),
                       message="toy project, imported base")
    src = _publish(root, tmp)
    env = _env(tmp / "mlflow.db", tmp / "parts-cache")
    start = time.time()
    out = repro(root, env, timeout=1100)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("MLFLOW_TRACKING_URI", "CTRLORA_PARTS_CACHE"):
            mp.setenv(k, env[k])
        yield {"root": root, "src": src, "ckpt": root / CHECKPOINT, "ran": stages_ran(root, start), "tmp": tmp,
               "out": out}


@pytest.fixture(scope="module")
def imported(graph):
    """The base in ``models/base`` loaded, and its hash."""
    from ctrlora.models import adapters as A
    from ctrlora.models.controlnet import CtrLoRAControlNet

    base = CtrLoRAControlNet.from_pretrained(graph["root"] / "models/base")
    return {"model": base, "hash": A.base_hash(base)}


def test_every_stage_ran(graph):
    assert graph["ran"] == {s: "ok" for s in STAGES}, graph["out"][-3000:]
    assert "[train_base] imported base" in graph["out"]


def test_the_base_is_the_imported_checkpoint(graph, imported):
    import torch
    from safetensors.torch import load_file

    from ctrlora.models import adapters as A
    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.convert import convert_base, read_state_dict

    root = graph["root"]
    got = load_file(str(root / "models/base" / WEIGHTS))
    # the checkpoint converted here, independently of the stage, onto the toy's backbone
    want = CtrLoRAControlNet.from_unet(load_backbone(root / "foundation/backbone").unet, condition_embedding="vae")
    weights, stale = convert_base(read_state_dict(graph["ckpt"]), want)
    assert stale  # the published layout's stale LoRA set was there and was discarded
    want.load_state_dict(weights, strict=True)
    want_sd = want.state_dict()
    assert sorted(got) == sorted(want_sd)
    for k, t in got.items():
        assert torch.equal(t, want_sd[k]), k
    src = load_file(str(graph["src"] / WEIGHTS))  # ... the exported source, not the UNet's copy
    assert sorted(src) == sorted(got) and all(torch.equal(got[k], src[k]) for k in src)
    assert imported["hash"] == A.base_hash(want)

    record = json.loads((root / "models/base/base_source.json").read_text())
    sha = hashlib.sha256(graph["ckpt"].read_bytes()).hexdigest()
    assert record["source"] == "imported" and record["checkpoint_sha256"] == sha
    assert record["checkpoint_format"] == "ckpt" and record["base_hash"] == imported["hash"]
    assert record["discarded_stale_lora_keys"] == len(stale) and record["conditions"] == BASE_CONDITIONS
    assert str(root) not in json.dumps(record)  # nothing machine-specific


def test_every_adapter_trained_on_the_frozen_imported_base(graph, imported):
    from safetensors.torch import load_file

    from ctrlora.models import adapters as A

    root, base = graph["root"], imported["model"]
    folders = {**{c: root / "models/base/adapters" / c for c in BASE_CONDITIONS},
               **{c: root / "models/adapters" / c for c in NEW_CONDITIONS}}
    assert sorted(p.name for p in (root / "models/base/adapters").iterdir()) == sorted(BASE_CONDITIONS)
    for c, folder in folders.items():
        cfg = A.read_adapter_config(folder)
        assert cfg["condition"] == c and cfg["base_hash"] == imported["hash"], (c, cfg)
        assert cfg["stage"] == ("train_base" if c in BASE_CONDITIONS else "train_adapter"), (c, cfg)
        if c in BASE_CONDITIONS:
            assert cfg["base_source"] == "imported", cfg
        lora_b = [t for k, t in load_file(str(folder / A.ADAPTER_WEIGHTS)).items() if k.endswith("lora_B.weight")]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b), c  # B starts at zero: it trained
        A.load_adapter(base, folder)  # its base hash matches the imported base


def test_evaluate_scores_every_condition(graph):
    metrics = json.loads((graph["root"] / "metrics/evaluate.json").read_text())
    for c in CONDITIONS:
        assert isinstance(metrics.get(c), dict) and math.isfinite(float(metrics[c]["fidelity"])), (c, metrics.get(c))


def test_registered_versions_name_the_imported_base(graph, imported):
    import mlflow
    from mlflow import MlflowClient

    from ctrlora.models import adapters as A
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from pipelines.registry import models as registry
    from pipelines.registry.dvclock import dataset_hash_from_lock

    root, bh = graph["root"], imported["hash"]
    sha = hashlib.sha256(graph["ckpt"].read_bytes()).hexdigest()
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    client = MlflowClient()
    assert sorted(m.name for m in client.search_registered_models()) == sorted(f"ctrlora-{c}" for c in CONDITIONS)
    for c in CONDITIONS:
        (mv,) = client.search_model_versions(f"name='ctrlora-{c}'")
        t = mv.tags
        assert t["base_hash"] == bh and t["dataset_hash"] == dataset_hash_from_lock(root, c), (c, t)
        assert t["base_source"] == "imported" and t["base_checkpoint_sha256"] == sha, (c, t)
        assert t["base_checkpoint_format"] == "ckpt", (c, t)
        assert float(t["metric.fidelity"]) == pytest.approx(metrics[c]["fidelity"]), (c, t)
        card = Path(mlflow.artifacts.download_artifacts(f"runs:/{mv.run_id}/model/artifacts/README.md",
                                                        dst_path=str(graph["tmp"] / "cards" / c))).read_text()
        assert f"`{bh}`" in card and "imported" in card and sha in card, card
    # the registered base part (what serving loads) is the imported base
    resolved = registry.resolve_adapter_uri(f"models:/ctrlora-{NEW_CONDITIONS[0]}@champion",
                                            graph["tmp"] / "resolved")
    assert A.base_hash(CtrLoRAControlNet.from_pretrained(resolved.base)) == bh
