"""End to end over the real project graph, at toy scale.

A copy of this repository (its tracked files, without dvc.lock and the repo's benchmark
manifests) becomes a fresh git + DVC repo in a temp dir with tiny parameters (a dozen scans, a
few training steps). Then, with the real Prefect test harness and a real sqlite MLflow store:

1. the ``pipeline`` flow runs every stage of the real ``dvc.yaml`` and registers one version per
   adapter, tagged with the dataset hash DVC records for that condition's data;
2. the lighting champion loads and generates in a fresh process;
3. the first registration froze the toy project's own benchmark v1 from its validation split
   (``pipelines.registry.frozen_benchmark``): a deployment never depends on another's files;
4. a second run is a no-op, in DVC and in the registry;
5. a broken canny model is registered: the gate scores it against v1 on the benchmark and
   refuses it; it is then forced in as champion;
6. new scans land (one of them corrupt): the retrain flow quarantines the bad one, ingests the
   good ones, retrains, and registers new versions whose dataset hash differs;
7. each new version was scored against its champion on benchmark v1 at its recipe's weight (tags:
   benchmark version, weight, interval, decision), and the alias follows the interval; against
   the broken canny champion it is clearly better and takes the alias.
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
from _project_helpers import toy_project

REPO = Path(__file__).resolve().parents[2]
BASE_CONDITIONS = ["segmentation", "depth", "canny", "palette"]
NEW_CONDITIONS = ["lighting", "normal"]


def _tiny_params(params: dict) -> dict:
    p = json.loads(json.dumps(params))
    p["render"].update(n=14, workers=1)
    p["prepare"].update(test_fraction=0.3, workers=1)
    tiny_train = {"batch_size": 4, "checkpoint_every": 0, "log_every": 1}
    p["embed"]["batch_size"] = 64
    p["train_base"]["train"].update(max_steps=4, **tiny_train)
    p["train_adapter"]["train"].update(max_steps=2, **tiny_train)
    p["train_adapter"]["max_pairs"] = None
    p["evaluate"].update(max_scans=3, grid_rows=2, guidance=[1.0], bootstrap={"n_boot": 200, "seed": 0})
    p["evaluate"]["sampling"].update(steps=2, batch_size=8)
    p["flows"].update(retries=0, retry_delay_seconds=0)
    p["evaluate"]["threads"] = 1  # toy models: threads only add overhead
    # the toy project's own benchmark: every test scan, two sampling steps
    p["register"]["benchmark"].update(max_scans=8, grid_rows=2, bootstrap={"n_boot": 200, "seed": 0})
    p["register"]["benchmark"]["sampling"].update(steps=2, batch_size=8)
    return p


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(cmd, cwd=cwd, check=True, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # the repo's benchmark manifests describe the repo's scans: the toy freezes its own
    return toy_project(tmp_path_factory.mktemp("e2e") / "project", _tiny_params(params),
                       skip=lambda rel: rel == "dvc.lock" or rel.startswith(("tests/fixtures/", "frozen_benchmark/")),
                       message="toy project")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    # stage processes inherit this environment: a toy sqlite store, one CPU thread each
    new = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    with prefect_test_harness(server_startup_timeout=None):
        yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _versions(client, condition: str) -> list:
    return sorted(client.search_model_versions(f"name='ctrlora-{condition}'"), key=lambda v: int(v.version))


def _register_broken(project: Path, condition: str, gate: dict):
    """Register a broken copy of the project's ``condition`` model, gated on the project's
    benchmark: LoRA B zeroed, the backbone's VAE decoder output layer zeroed (flat images)."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    from pipelines.registry.dvclock import dataset_hash_from_lock
    from pipelines.registry.frozen_benchmark import gate_for
    from pipelines.registry.registration import register_adapter

    work = project.parent / f"broken-{condition}"
    adapter, backbone = work / "adapter", work / "backbone"
    shutil.copytree(project / "models/base/adapters" / condition, adapter)
    shutil.copytree(project / "foundation/backbone", backbone)  # the shipped backbone the record names
    for f, broken in ((adapter / "adapter_model.safetensors", "lora_B"),
                      (backbone / "vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.")):
        weights = load_file(f)
        hit = [k for k in weights if broken in k]
        assert hit, f"{f}: no {broken} weights"
        save_file({k: v.zero_() if k in hit else v for k, v in weights.items()}, f)
    base_hash = json.loads((adapter / "adapter_config.json").read_text())["base_hash"]
    with gate_for(project, gate) as judge:
        res = register_adapter(condition, adapter, dataset_hash=dataset_hash_from_lock(project, condition),
                               base_hash=base_hash, backbone_dir=backbone, base_dir=project / "models/base",
                               metrics=None, git_commit="broken", gate=gate, judge=judge,
                               dataset_path=project / "data/prepared/conditions" / condition)
    return MlflowClient().get_model_version(res.model_name, res.version)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4.5 min alone; the whole graph twice, a retrain and 7 gate comparisons
def test_pipeline_register_noop_and_retrain_on_landed_scans(project, harness):
    from mlflow import MlflowClient

    from pipelines.orchestration.flows import pipeline, retrain_on_new_scans
    from pipelines.registry.dvclock import dataset_hash_from_lock
    from pipelines.registry.registration import promote

    # 1. the whole real graph, each stage a task run, then registration
    first = pipeline(str(project))
    stages = [s["stage"] for s in first["stages"]]
    for expected in ("render", "prepare", "backbone", "embed", "train_base", "train_adapter@lighting",
                     "train_adapter@normal", "evaluate"):
        assert expected in stages
    assert all(s["status"] == "ran" for s in first["stages"])
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    client = MlflowClient()
    for c in BASE_CONDITIONS + NEW_CONDITIONS:
        (v1,) = _versions(client, c)
        assert v1.tags["dataset_hash"] == dataset_hash_from_lock(project, c)
        assert float(v1.tags["metric.fidelity"]) == pytest.approx(metrics[c]["fidelity"])
        assert len(v1.tags["adapter_hash"]) == 64 and len(v1.tags["base_hash"]) == 64
    assert str(client.get_model_version_by_alias("ctrlora-lighting", "champion").version) == "1"

    # 2. the champion loads and generates in a fresh process
    script = textwrap.dedent("""
        import base64, io, sys
        import numpy as np, pandas as pd, mlflow
        from PIL import Image
        model = mlflow.pyfunc.load_model("models:/ctrlora-lighting@champion")
        cond = Image.open(sys.argv[1]).convert("RGB")
        buf = io.BytesIO(); cond.save(buf, format="PNG")
        out = model.predict(pd.DataFrame({"condition_image": [buf.getvalue()], "prompt": ["dental photo"],
                                          "steps": [2], "seed": [0]}))
        img = Image.open(io.BytesIO(out["image"].iloc[0]))
        print(img.size, np.asarray(img).std())
    """)
    cond_png = next((project / "data/prepared/conditions/lighting").glob("*.png"))
    proc = subprocess.run([sys.executable, "-c", script, str(cond_png)], cwd=project, capture_output=True,
                          text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    size, std = proc.stdout.strip().rsplit(" ", 1)
    assert size == "(64, 64)" and float(std) > 0

    # 3. the first registration froze the toy project's own benchmark from its validation split
    #    (promotion is model selection: never the test split the report is made on)
    manifest_file = project / "frozen_benchmark/v1.json"
    frozen = manifest_file.read_bytes()
    manifest = json.loads(frozen)
    splits = json.loads((project / "data/prepared/meta/splits.json").read_text())
    assert manifest["split"] == "validation"
    assert len(manifest["scan_ids"]) >= 2 and set(manifest["scan_ids"]) <= set(splits["validation"])
    assert not set(manifest["scan_ids"]) & set(splits["test"])
    shown = json.loads(_run([sys.executable, "-m", "pipelines.registry.frozen_benchmark", "show", "--json", "--repo",
                             str(project)], project).stdout)
    assert shown["version"] == 1 and shown["verified"] is True
    _run(["git", "add", "frozen_benchmark"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "benchmark v1"], project)

    # 4. nothing changed: DVC runs nothing, the registry gains nothing
    second = pipeline(str(project))
    assert {s["status"] for s in second["stages"]} == {"unchanged"}
    for c in BASE_CONDITIONS + NEW_CONDITIONS:
        assert len(_versions(client, c)) == 1

    # 5. a broken canny model becomes champion: its adapter's LoRA B zeroed (at toy scale that alone
    #    leaves the benchmark scores as they were: a two-step adapter barely moves the images) and a backbone whose VAE decoder draws flat images (no edges:
    #    edge F1 0). The gate scores it against v1 on the benchmark and refuses it (clearly worse);
    #    a person then forces it in, as a bad manual promotion would
    gate = yaml.safe_load((project / "params.yaml").read_text())["register"]["gate"]
    min_delta = float(gate["min_delta"])
    broken_champion = _register_broken(project, "canny", gate)
    t = broken_champion.tags
    assert str(broken_champion.version) == "2" and t["gate"] == "challenger" and t["benchmark_version"] == "1"
    assert float(t["gate_high"]) < 0, t  # clearly worse: the whole interval below zero
    assert promote("canny", 2, force=True, reason="a bad manual promotion, on purpose").promoted
    assert str(client.get_model_version_by_alias("ctrlora-canny", "champion").version) == "2"

    # 6. new scans land: three good, one corrupt (truncated photo), one still incomplete
    incoming = project / "data/incoming"
    _run([sys.executable, "-m", "ctrlora.cli", "render", "--out", str(incoming), "--n", "5", "--seed", "7",
          "--workers", "1", "--no-progress"], project)
    landed = sorted(p.name for p in incoming.iterdir())
    corrupt, incomplete = landed[0], landed[1]
    photo = incoming / corrupt / "photo.png"
    photo.write_bytes(photo.read_bytes()[:100])
    (incoming / incomplete / "READY").unlink()
    old_hash = dataset_hash_from_lock(project, "lighting")

    result = retrain_on_new_scans(str(project))
    assert result["status"] == "retrained"
    # two good scans on a toy training split of a few: far above base_refresh.growth, so the base
    # retrains too (a small landing leaves data/base_pairs.json and the base as they were)
    ran = {s["stage"]: s["status"] for s in result["pipeline"]["stages"]}
    assert ran["base_pairs"] == "ran" and ran["train_base"] == "ran", ran
    reason = json.loads((project / "data/quarantine" / corrupt / "reason.json").read_text())
    assert "photo.png" in json.dumps(reason)
    assert (incoming / incomplete).is_dir()  # left alone until complete
    for good in landed[2:]:
        assert (project / "data/scans" / good).is_dir()
    new_hash = dataset_hash_from_lock(project, "lighting")
    assert new_hash != old_hash
    versions = _versions(client, "lighting")
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert versions[0].tags["dataset_hash"] == old_hash and versions[1].tags["dataset_hash"] == new_hash
    # the benchmark did not move: same manifest, none of the landed scans in it
    assert manifest_file.read_bytes() == frozen and not set(landed) & set(manifest["scan_ids"])

    # 7. every new version was scored against the champion in one run on benchmark v1, at the
    #    recipe's residual weight, and the alias followed the paired interval. Against the broken
    #    canny champion the retrained canny is clearly better: it moves the alias
    for c in BASE_CONDITIONS + NEW_CONDITIONS:
        versions = _versions(client, c)
        new, champ = (("3", "2") if c == "canny" else ("2", "1"))
        assert [str(v.version) for v in versions][-1] == new, c
        mv = client.get_model_version(f"ctrlora-{c}", new)
        t = mv.tags
        assert t["benchmark_version"] == "1" and t["gate_champion_version"] == champ, (c, t)
        low, delta, high = (float(t[k]) for k in ("gate_low", "gate_delta", "gate_high"))
        assert low <= delta <= high and int(t["gate_n_scans"]) == len(manifest["scan_ids"]), (c, t)
        assert "benchmark v1" in t["gate_reason"], (c, t)
        winner = client.get_model_version_by_alias(f"ctrlora-{c}", "champion")
        if c == "canny":
            assert low > min_delta and t["gate"] == "champion" and "promoted" in t["gate_reason"], t
            assert str(winner.version) == "3"
        else:
            # a retrain on more data may or may not beat its champion on the toy benchmark (at the
            # recipe's residual weight its difference shows more): whichever, the decision is the
            # interval's, and the alias follows it
            if low > min_delta:
                assert t["gate"] == "champion" and "promoted" in t["gate_reason"], (c, t)
                assert str(winner.version) == new, (c, mv.aliases)
            else:
                assert t["gate"] == "challenger" and "champion kept" in t["gate_reason"], (c, t)
                assert list(mv.aliases) == ["challenger"] and str(winner.version) == "1", (c, mv.aliases)
            assert float(t["gate_weight"]) == 2.0, (c, t)  # the recipe's weight (evaluate.condition_weights)
        # the registering run holds the side-by-side grid and the per-scan scores
        logged = {Path(a.path).name for a in client.list_artifacts(mv.run_id, "gate")}
        assert {Path(t["gate_grid"]).name, f"{c}_per_scan.csv"} <= logged, (c, logged)
    # what a person reading `pytest -s` sees: the versions and tags the retrain produced
    for c in BASE_CONDITIONS + NEW_CONDITIONS:
        for v in _versions(client, c):
            v = client.get_model_version(f"ctrlora-{c}", str(v.version))  # search results omit aliases
            tags = {k: v.tags.get(k) for k in ("dataset_hash", "benchmark_version", "gate_delta", "gate_low",
                                               "gate_high", "gate")}
            print(f"ctrlora-{c} v{v.version} aliases={list(v.aliases)} {tags}")
