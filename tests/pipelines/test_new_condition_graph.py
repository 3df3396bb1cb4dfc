"""A new condition added through params.yaml alone trains and is evaluated by the real graph.

A copy of this repository (tracked files, a fresh git repo) whose params.yaml declares one more
condition, ``blur_strong`` (the blur op at sigma 4 px instead of blur's 2), and makes it the new
condition of ``train_adapter`` on a base trained on ``canny``; no code changes. The documented
steps follow: ``python -m pipelines.orchestration.dvc_deps`` writes the condition's folder into
``dvc.yaml``, then ``dvc repro evaluate`` runs render, prepare, backbone, embed, train_base,
``train_adapter@blur_strong`` and evaluate at toy size (a dozen 64 px scans, 2 steps). Checked:
the prepared images are blur at sigma 4, the adapter trained, and ``metrics/evaluate.json`` scores
it with its table metric (SSIM of the same op re-run on the generated images).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from _project_helpers import toy_project

REPO = Path(__file__).resolve().parents[2]
NEW = "blur_strong"
ENTRY = {"kind": "derived", "op": "blur", "sigma": 4.0, "metric": "ssim", "detector": "none"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _params() -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["conditions"][NEW] = ENTRY   # the whole declaration of the new condition
    p["render"].update(n=12, workers=1)
    p["prepare"].update(test_fraction=0.3, workers=1, conditions=["canny", NEW])
    p["embed"]["batch_size"] = 64
    steps = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0, "log_every": 1}
    p["train_base"].update(conditions=["canny"], condition_shares={})
    p["train_base"]["train"].update(**steps)
    p["train_adapter"].update(conditions=[NEW], max_pairs=None)
    p["train_adapter"]["train"].update(**steps)
    ev = p["evaluate"]
    ev.update(max_scans=2, grid_rows=2, guidance=[1.0], gate_guidance=1.0, bootstrap={"n_boot": 50, "seed": 0},
              condition_weights={"canny": 2.0, NEW: 2.0}, combined={"canny": 2.0, NEW: 2.0},
              workers=1, threads=1, progress=False)
    ev["sampling"].update(steps=2, batch_size=8)
    return p


def test_a_condition_declared_in_params_trains_and_is_scored(tmp_path):
    from ctrlora.data.conditions import gaussian_blur
    from ctrlora.data.files import read_png

    root = toy_project(tmp_path / "project", _params(),
                       skip=lambda rel: rel == "dvc.lock" or rel.startswith(("tests/", "frozen_benchmark/")),
                       message="toy project, a new condition in params")
    env = {k: v for k, v in os.environ.items() if k != "CTRLORA_PARAMS"}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")

    def run(*cmd: str) -> str:
        done = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=800)
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    stale = subprocess.run([sys.executable, "-m", "pipelines.orchestration.dvc_deps", "--check"], cwd=root,
                           env=env, capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1 and NEW in stale.stdout, stale.stdout + stale.stderr
    run(sys.executable, "-m", "pipelines.orchestration.dvc_deps")
    graph = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert "${paths.prepared}/conditions/" + NEW in graph["prepare"]["outs"]
    assert "${paths.prepared}/conditions/" + NEW in graph["embed"]["deps"]
    run(str(Path(sys.executable).parent / "dvc"), "repro", "-q", "evaluate")

    photos = sorted((root / "data/prepared/photos").iterdir())
    assert photos
    for p in photos[:3]:
        photo = read_png(p, "RGB").astype(np.float32) / 255.0
        want = np.clip(np.round(np.clip(gaussian_blur(photo, sigma=4.0), 0, 1) * 255), 0, 255).astype(np.uint8)
        assert np.array_equal(read_png(root / "data/prepared/conditions" / NEW / p.name, "RGB"), want), p.name
    assert (root / "models/adapters" / NEW).is_dir()
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics[NEW]["metric"] == "ssim" and math.isfinite(float(metrics[NEW]["fidelity"])), metrics[NEW]
