"""Prefect flows over a real DVC graph: a temp git + DVC repo with a tiny dvc.yaml of fast Python
stages (written here), the real Prefect test harness, a real sqlite MLflow store in tmp_path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")
pytest.importorskip("dvc")

STAGES = ["backbone", "prepare", "train@depth", "train@lighting", "evaluate"]

PREPARE = """\
import os, sys, yaml
p = yaml.safe_load(open("params.yaml"))["prepare"]
for c in p["conditions"]:
    os.makedirs(f"data/prepared/conditions/{c}", exist_ok=True)
    with open(f"data/prepared/conditions/{c}/pairs.jsonl", "w") as fh:
        fh.write(open("src/scans.txt").read() + c + "\\n")
"""
BACKBONE = """\
import os
for d in ("models/backbone/unet", "models/base"):
    os.makedirs(d, exist_ok=True)
open("models/backbone/unet/config.json", "w").write("{}")
open("models/base/config.json", "w").write("{}")
"""
TRAIN = """\
import hashlib, json, os, sys
c = sys.argv[1]
if os.environ.get("TEST_FAIL_ALWAYS") == c:
    sys.exit(f"boom: injected permanent failure in train@{c}")
flaky = os.environ.get("TEST_FLAKY_MARKER")
if flaky and os.environ.get("TEST_FLAKY_STAGE") == c and not os.path.exists(flaky):
    open(flaky, "w").write("failed once")
    sys.exit(f"transient failure injected in train@{c}")
data = open(f"data/prepared/conditions/{c}/pairs.jsonl", "rb").read()
os.makedirs(f"models/adapters/{c}", exist_ok=True)
open(f"models/adapters/{c}/adapter_model.safetensors", "wb").write(hashlib.sha256(data).digest())
json.dump({"condition": c, "rank": 2, "base_hash": "f" * 64}, open(f"models/adapters/{c}/adapter_config.json", "w"))
"""
EVALUATE = """\
import json, os
os.makedirs("metrics", exist_ok=True)
json.dump({c: {"fidelity": 0.5 + 0.1 * i} for i, c in enumerate(sorted(
          d for d in os.listdir("models/adapters") if os.path.isdir(f"models/adapters/{d}")))},
          open("metrics/evaluate.json", "w"))
"""
DVC_YAML = """\
stages:
  prepare:
    cmd: python src/prepare.py
    deps: [src/prepare.py, src/scans.txt]
    params: [prepare]
    outs:
      - data/prepared/conditions/lighting
      - data/prepared/conditions/depth
  backbone:
    cmd: python src/backbone.py
    deps: [src/backbone.py]
    outs: [models/backbone, models/base]
  train:
    foreach: [lighting, depth]
    do:
      cmd: python src/train.py ${item}
      deps: [src/train.py, "data/prepared/conditions/${item}", models/base]
      outs: ["models/adapters/${item}"]
  evaluate:
    cmd: python src/evaluate.py
    deps: [src/evaluate.py, models/adapters/lighting, models/adapters/depth]
    metrics: [metrics/evaluate.json: {cache: false}]
"""
PARAMS = """\
prepare:
  conditions: [lighting, depth]
flows:
  retries: 0
  retry_delay_seconds: 0
register:
  gate: {metric: fidelity, mode: max, min_delta: 0}
"""


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    # None: use PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (120 s, pipelines.settings)
    with prefect_test_harness(server_startup_timeout=None):
        yield


def _run(cmd, cwd):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(cmd, cwd=cwd, check=True, env=env, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "src").mkdir(parents=True)
    for name, text in {"prepare.py": PREPARE, "backbone.py": BACKBONE, "train.py": TRAIN,
                       "evaluate.py": EVALUATE}.items():
        (root / "src" / name).write_text(text)
    (root / "src" / "scans.txt").write_text("scan-001\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(PARAMS)
    # a research graph beside the production one: the production flow must never run it
    (root / "research").mkdir()
    (root / "research" / "dvc.yaml").write_text(
        "stages:\n  ablation:\n    cmd: python -c \"raise SystemExit('research ran')\"\n"
        "    wdir: ..\n    deps: [models/adapters/lighting]\n    outs: [models/research]\n")
    _run(["git", "init", "-q"], root)
    for args in (["init", "-q"], ["config", "core.analytics", "false"],
                 ["config", "core.site_cache_dir", ".dvc/site_cache"]):
        _run([sys.executable, "-m", "dvc", *args], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-flows")
    monkeypatch.delenv("TEST_FAIL_ALWAYS", raising=False)
    monkeypatch.delenv("TEST_FLAKY_MARKER", raising=False)
    return root


def _task_runs(flow_state) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {r.name: r for r in runs}


def test_stage_order_comes_from_dvc(repo):
    from pipelines.flows import dvc_stages

    assert dvc_stages(repo) == STAGES


def test_pipeline_runs_each_stage_as_a_task_then_registers_and_is_a_noop_twice(prefect_harness, repo):
    from mlflow import MlflowClient

    from pipelines.flows import pipeline

    state = pipeline(str(repo), return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert [s["stage"] for s in out["stages"]] == STAGES
    assert all(s["status"] == "ran" for s in out["stages"])
    runs = _task_runs(state)
    assert {f"dvc-stage[{s}]" for s in STAGES} <= set(runs)
    assert all(runs[f"dvc-stage[{s}]"].state.is_completed() for s in STAGES)
    assert "register-and-promote" in {n.rsplit("-", 1)[0] for n in runs}

    reg = {r["condition"]: r for r in out["registered"]}
    assert set(reg) == {"lighting", "depth"}
    lock = json.dumps((repo / "dvc.lock").read_text())
    client = MlflowClient()
    for c, r in reg.items():
        assert r["created"] and r["version"] == "1" and r["decision"] == "champion"
        mv = client.get_model_version(f"ctrlora-{c}", "1")
        assert mv.tags["dataset_hash"].endswith(".dir") and mv.tags["dataset_hash"] in lock
        assert mv.tags["base_hash"] == "f" * 64
        assert len(mv.tags["git_commit"]) >= 40
    assert float(client.get_model_version("ctrlora-lighting", "1").tags["metric.fidelity"]) == 0.6

    again = pipeline(str(repo), return_state=True)
    assert again.is_completed(), again.message
    second = again.result()
    assert [s["status"] for s in second["stages"]] == ["unchanged"] * len(STAGES)
    assert all(not r["created"] and r["version"] == "1" for r in second["registered"])
    for c in ("lighting", "depth"):
        assert len(client.search_model_versions(f"name='ctrlora-{c}'")) == 1


def test_transient_stage_failure_is_retried(prefect_harness, repo, tmp_path, monkeypatch):
    from pipelines.flows import pipeline

    marker = tmp_path / "flaky-failed-once"
    monkeypatch.setenv("TEST_FLAKY_MARKER", str(marker))
    monkeypatch.setenv("TEST_FLAKY_STAGE", "lighting")
    state = pipeline(str(repo), register_models=False, retries=1, retry_delay_seconds=0, return_state=True)
    assert state.is_completed(), state.message
    assert marker.is_file()  # the failure really happened once
    runs = _task_runs(state)
    assert runs["dvc-stage[train@lighting]"].run_count == 2
    assert runs["dvc-stage[train@depth]"].run_count == 1
    assert (repo / "models/adapters/lighting/adapter_model.safetensors").is_file()


def test_persistent_stage_failure_fails_flow_and_leaves_registry_untouched(
        prefect_harness, repo, tmp_path, monkeypatch):
    from pipelines.flows import StageFailed, pipeline

    monkeypatch.setenv("TEST_FAIL_ALWAYS", "depth")
    state = pipeline(str(repo), retries=1, retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="boom: injected permanent failure in train@depth") as err:
        state.result()
    assert err.value.stage == "train@depth"
    runs = _task_runs(state)
    assert runs["dvc-stage[train@depth]"].run_count == 2  # tried, retried, gave up
    assert "dvc-stage[evaluate]" not in runs
    assert not any(n.startswith("register-and-promote") for n in runs)
    assert not (tmp_path / "mlflow.db").exists()  # the registry was never even opened


def test_retrain_without_new_scans_ends_quickly(prefect_harness, repo):
    from pipelines.flows import retrain_on_new_scans

    partial = repo / "data" / "incoming" / "scan-002"  # still landing: no READY marker
    partial.mkdir(parents=True)
    (partial / "photo.png").write_bytes(b"partial")
    start = time.perf_counter()
    out = retrain_on_new_scans(str(repo))
    assert out["status"] == "no-new-scans" and "nothing to do" in out["message"]
    assert time.perf_counter() - start < 20
    assert not (repo / "dvc.lock").exists()  # nothing ran


def test_watch_emits_landed_event_for_complete_scans_only(prefect_harness, repo, capsys):
    from pipelines.flows import EVENT, complete_scans, emit_landed

    incoming = repo / "data" / "incoming"
    for sid, ready in (("scan-a", True), ("scan-b", False)):
        (incoming / sid).mkdir(parents=True)
        if ready:
            (incoming / sid / "READY").write_text("")
    assert complete_scans(incoming) == ["scan-a"]
    event = emit_landed(repo, complete_scans(incoming))
    assert event is not None and event.event == EVENT
    assert event.payload["scans"] == ["scan-a"]
    assert event.resource.id.startswith("ctrlora.incoming.")


def test_deployment_has_schedule_and_scans_landed_trigger(prefect_harness, repo):
    from pipelines.flows import EVENT, build_deployment

    dep = build_deployment(repo, cron="0 2 * * *")
    (trigger,) = dep.triggers
    assert trigger.expect == {EVENT}
    assert trigger.match.model_dump()["prefect.resource.id"] == "ctrlora.incoming.*"
    assert dep.parameters == {"repo_root": str(repo)}
    assert dep.schedules[0].schedule.cron == "0 2 * * *"
    dep = build_deployment(repo, interval=3600)
    assert dep.schedules[0].schedule.interval.total_seconds() == 3600
