"""The foundation graph (foundation/dvc.yaml, ``make foundation``), through real DVC, at toy scale.

A copy of the repository's tracked files becomes a fresh git repo in a temp dir with a dozen
rendered scans and a few training steps. Checked:

* ``foundation/`` is a DVC project of its own: the production graph does not see its stages, and
  it reproduces the backbone and the re-detectors from the rendered scans;
* the production ``backbone`` stage records the shipped backbone (relative path + content hash,
  nothing specific to the machine), and every later stage loads it through the record;
* landed scans never make the foundation stale (it reads the rendered scans alone);
* the committed foundation is what ``foundation/dvc.lock`` says it is (the shipped weights are
  the outputs of the recorded run).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _project_helpers import toy_project

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _toy_params(params: dict) -> dict:
    p = json.loads(json.dumps(params))
    p["render"].update(n=14, workers=1)
    p["prepare"].update(test_fraction=0.3, workers=1)
    tiny = {"batch_size": 4, "checkpoint_every": 0, "log_every": 1}
    p["backbone"]["vae"]["train"].update(max_steps=2, warmup_steps=0, **tiny)
    p["backbone"]["unet"]["train"].update(max_steps=2, warmup_steps=0, **tiny)
    p["backbone"]["quality"].update(samples=3, steps=2)
    p["detectors"].update(config={"epochs": 1}, threads=1, progress=False)
    return p


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return toy_project(tmp_path_factory.mktemp("foundation") / "project", _toy_params(params),
                       skip=lambda rel: rel.startswith(("tests/", "frozen_benchmark/", "research/"))
                       or rel.endswith("dvc.lock"))


def test_foundation_graph_rebuilds_and_the_production_graph_reads_it(toy):
    shipped = {f.relative_to(toy): f.read_bytes() for f in (toy / "foundation/backbone").rglob("*") if f.is_file()}
    # the production graph does not list the foundation's stages
    assert "detectors" not in _run([DVC, "stage", "list"], toy)
    _run([DVC, "repro", "render"], toy)
    out = _run([DVC, "repro"], toy / "foundation")
    for stage in ("prepare", "backbone", "detectors"):
        assert f"Running stage '{stage}'" in out
    rebuilt = {f.relative_to(toy): f.read_bytes() for f in (toy / "foundation/backbone").rglob("*") if f.is_file()}
    assert set(rebuilt) == set(shipped) and rebuilt != shipped  # same layout, newly trained weights
    for c in ("segmentation", "depth", "lighting", "normal"):
        assert (toy / "foundation/detectors" / c / "detector.safetensors").is_file()
    assert (toy / "foundation/reports/backbone/samples.png").is_file()
    assert "up to date" in _run([DVC, "status"], toy / "foundation").lower()

    # a landed scan changes the production data, never the foundation
    (toy / "data/scans/landed-0").mkdir(parents=True)
    (toy / "data/scans/landed-0/photo.png").write_bytes(b"not read by the foundation")
    assert "up to date" in _run([DVC, "status"], toy / "foundation").lower()
    shutil.rmtree(toy / "data/scans/landed-0")

    # the production backbone stage records the foundation's backbone; later stages resolve it
    _run([DVC, "repro", "backbone"], toy)
    rec = json.loads((toy / "models/backbone/backbone.json").read_text())
    assert rec["preset"] == "tiny" and rec["path"] == "../../foundation/backbone"
    from ctrlora.models.backbone import backbone_hash
    from pipelines.stages.common import backbone_part, resolve_backbone

    assert rec["hash"] == backbone_hash(toy / "foundation/backbone")
    assert resolve_backbone(toy / "models/backbone") == (toy / "foundation/backbone").resolve()
    assert backbone_part(toy / "models/backbone", toy) == (toy / "foundation/backbone").resolve()


def test_a_missing_sd15_directory_fails_the_backbone_stage_with_the_setting_to_fix(toy, tmp_path):
    params = yaml.safe_load((toy / "params.yaml").read_text())
    params["backbone"].update(preset="sd15", sd15_path=str(tmp_path / "no-such-sd15"))
    alt = tmp_path / "params.yaml"
    alt.write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, CTRLORA_PARAMS=str(alt))
    done = subprocess.run([sys.executable, "-m", "pipelines.stages.record_backbone"], cwd=toy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "backbone.sd15_path" in done.stderr and "no-such-sd15" in done.stderr


def test_the_committed_foundation_is_the_output_of_its_recorded_run():
    """The committed weights are what foundation/dvc.lock recorded as the outputs of its run: DVC
    finds no changed output of the backbone and detectors stages (changed code deps are allowed:
    a later edit of the library does not by itself rebuild the shipped foundation)."""
    done = subprocess.run([DVC, "status", "--json", "backbone", "detectors"], cwd=REPO / "foundation",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout or "{}")
    changed_outs = {stage: [e for e in entries if isinstance(e, dict) and "changed outs" in e]
                    for stage, entries in status.items()}
    assert not any(changed_outs.values()), changed_outs
    lock = yaml.safe_load((REPO / "foundation/dvc.lock").read_text())
    recorded = {o["path"] for st in lock["stages"].values() for o in st.get("outs", [])}
    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    assert {paths["foundation"]["backbone"], paths["detectors"]} <= recorded
