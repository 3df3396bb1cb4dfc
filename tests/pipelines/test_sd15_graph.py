"""The production graph on SD 1.5, through ``make repro``'s own command (marker ``sd15``; ``make test-sd15``).

A random-weight SD 1.5 (the full architecture: UNet, VAE and CLIP text encoder of
:func:`ctrlora.models.sizes.random_sd15_backbone`) is written in the diffusers layout to a temp
folder. A toy copy of the repository (tracked files, a fresh git repo, as test_e2e makes it) gets
``backbone.preset: sd15`` pointing there, 64 px, a few scans and two training steps, and runs
``python -m pipelines.orchestration.repro`` -- ``dvc repro`` over every stage of the real
``dvc.yaml`` (render, prepare, backbone, embed, train_base, train_adapter, evaluate), then
registration into a sqlite MLflow store (which freezes the toy project's benchmark v1), then the
README report. Checked afterwards:

* every stage ran; the backbone record names the SD 1.5 folder; the embed cache has SD 1.5's
  shapes; the evaluation scored every condition;
* each condition's first version is registered and champion, tagged with its dataset hash; the
  lighting champion loads from the registry in a fresh process (its backbone part is the record
  of the local SD 1.5, not a copy) and draws a 64 px image;
* a retrain of the adapter (another seed) reruns only train_adapter and evaluate, and its new
  version is scored against the champion on the frozen benchmark before the alias may move.

The random SD 1.5 keeps its 512 px native size on 64 px scans: the evaluation draws every image,
the uncontrolled ones included, at the scans' size (``test_generation_size.py``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from _project_helpers import repro, stages_ran, toy_project

REPO = Path(__file__).resolve().parents[2]
BASE_CONDITIONS = ["segmentation", "depth"]
NEW = "lighting"
RESOLUTION = 64
STAGES = ["render", "prepare", "backbone", "embed", "base_pairs", "train_base", f"train_adapter@{NEW}", "evaluate"]

# ~8 min alone on 2 shared cores (each stage loads the 4.3 GB backbone); peak ~9 GB
pytestmark = [pytest.mark.sd15, pytest.mark.slow, pytest.mark.timeout(3600)]


def _params(sd15: Path) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    conditions = [*BASE_CONDITIONS, NEW]
    p["render"].update(n=14, workers=1, resolution=RESOLUTION)
    p["prepare"].update(resolution=RESOLUTION, test_fraction=0.3, workers=1)
    p["backbone"].update(preset="sd15", sd15_path=str(sd15))
    p["embed"]["batch_size"] = 8
    steps = {"max_steps": 2, "batch_size": 1, "checkpoint_every": 0, "log_every": 1, "warmup_steps": 0}
    p["train_base"].update(conditions=BASE_CONDITIONS, condition_shares={})
    # bf16 autocast, checkpointing, the frozen UNet in bf16: the SD 1.5 base step in ~9 GB on a CPU
    p["train_base"]["train"].update(**steps, memory_preset="16gb_no_bnb")
    p["train_adapter"].update(conditions=[NEW], rank=128, max_pairs=None)
    p["train_adapter"]["train"].update(**steps)
    ev = p["evaluate"]
    ev.update(max_scans=3, grid_rows=2, guidance=[1.0], gate_guidance=1.0, bootstrap={"n_boot": 200, "seed": 0},
              condition_weights={c: w for c, w in ev["condition_weights"].items() if c in conditions},
              combined={c: w for c, w in ev["combined"].items() if c in conditions},
              threads=1, progress=False)
    if "workers" in ev:
        ev["workers"] = 1  # one process: every generating process holds its own 5.7 GB of SD 1.5
    ev["sampling"].update(steps=2, batch_size=4)
    bench = p["register"]["benchmark"]
    bench.update(max_scans=3, grid_rows=2, bootstrap={"n_boot": 200, "seed": 0})
    bench["sampling"].update(steps=2, batch_size=4)
    p["flows"].update(retries=0, retry_delay_seconds=0)
    return p


def _env(db: Path) -> dict[str, str]:
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                MLFLOW_TRACKING_URI=f"sqlite:///{db}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                TQDM_DISABLE="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """(project root, SD 1.5 dir, env, stages of the first repro, its output) after one repro."""
    import time

    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.sizes import random_sd15_backbone

    tmp = tmp_path_factory.mktemp("sd15graph")
    bb = random_sd15_backbone(CAPTION_VOCABULARY)
    sd15 = bb.save(tmp / "sd15")
    del bb
    root = toy_project(tmp / "project", _params(sd15),
                       skip=lambda rel: rel == "dvc.lock" or rel.startswith(("tests/fixtures/", "frozen_benchmark/")),
                       message="toy project on SD 1.5")
    env = _env(tmp / "mlflow.db")
    start = time.time()
    out = repro(root, env)
    yield root, sd15, env, stages_ran(root, start), out
    shutil.rmtree(tmp, ignore_errors=True)  # gigabytes of random weights


def test_every_stage_runs_on_sd15(graph):
    root, sd15, _, ran, _ = graph
    assert ran == {s: "ok" for s in STAGES}
    record = json.loads((root / "models/backbone/backbone.json").read_text())
    assert record["preset"] == "sd15" and record["path"] == str(sd15)
    from ctrlora.training.embed import load_embed_cache

    cache = load_embed_cache(root / "data/embed", [*BASE_CONDITIONS, NEW])
    assert tuple(cache.photo_mean.shape[1:]) == (4, RESOLUTION // 8, RESOLUTION // 8)
    assert tuple(cache.text.shape[1:]) == (77, 768)
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    for c in [*BASE_CONDITIONS, NEW]:
        assert metrics[c]["n_scans"] == 3 and metrics[c]["fidelity"] is not None
    assert metrics["params"]["adapters"][NEW] == 36_945_536  # SD 1.5's rank-128 adapter


def test_registered_champions_load_and_generate(graph):
    root, _, env, _, out = graph
    assert "benchmark v1" in out
    script = textwrap.dedent("""
        import io, json, sys
        import numpy as np, pandas as pd, mlflow
        from mlflow import MlflowClient
        from PIL import Image
        from pipelines.registry.dvclock import dataset_hash_from_lock
        client = MlflowClient()
        for c in sys.argv[2:]:
            (v,) = client.search_model_versions(f"name='ctrlora-{c}'")
            assert str(client.get_model_version_by_alias(f"ctrlora-{c}", "champion").version) == "1", c
            assert v.tags["dataset_hash"] == dataset_hash_from_lock(".", c), c
        model = mlflow.pyfunc.load_model("models:/ctrlora-lighting@champion")
        buf = io.BytesIO(); Image.open(sys.argv[1]).convert("RGB").save(buf, format="PNG")
        got = model.predict(pd.DataFrame({"condition_image": [buf.getvalue()], "prompt": ["upper molar"],
                                          "steps": [1], "seed": [0]}))
        img = Image.open(io.BytesIO(got["image"].iloc[0]))
        print(json.dumps({"size": list(img.size), "std": float(np.asarray(img).std())}))
    """)
    cond = sorted((root / "data/prepared/conditions" / NEW).rglob("*.png"))[0]
    done = subprocess.run([sys.executable, "-c", script, str(cond), *BASE_CONDITIONS, NEW], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["size"] == [RESOLUTION, RESOLUTION] and res["std"] > 0


def test_a_retrained_adapter_reruns_its_branch_and_is_gated_on_the_benchmark(graph):
    import time

    from mlflow import MlflowClient

    root, _, env, _, _ = graph
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_adapter"]["train"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.time()
    repro(root, env)
    assert stages_ran(root, start) == {f"train_adapter@{NEW}": "ok", "evaluate": "ok"}
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        client = MlflowClient()
        versions = {str(v.version): v for v in client.search_model_versions(f"name='ctrlora-{NEW}'")}
        for c in BASE_CONDITIONS:  # unchanged adapters: nothing new
            assert len(client.search_model_versions(f"name='ctrlora-{c}'")) == 1
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert set(versions) == {"1", "2"}
    tags = versions["2"].tags
    # scored against v1 on benchmark v1 (two training steps: whichever way the interval falls)
    assert tags["benchmark_version"] == "1" and tags["gate"] in ("champion", "challenger")
    assert "gate_low" in tags and "gate_high" in tags
