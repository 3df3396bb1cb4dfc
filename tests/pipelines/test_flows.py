"""Prefect flows over a real DVC graph: a temp git + DVC repo with a tiny dvc.yaml of fast Python
stages (tests/_flows_helpers.py), the real Prefect test harness, a real sqlite MLflow store in
tmp_path, real scans landed by ``ctrlora render`` and ingested by ``pipelines.orchestration.ingest``."""
from __future__ import annotations

import json
import os
import time

import pytest
from _flows_helpers import STAGES, land_scans, make_toy_repo

pytest.importorskip("prefect")
pytest.importorskip("dvc")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    # None: use PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (120 s, pipelines.settings)
    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture
def repo(tmp_path, monkeypatch):
    root = make_toy_repo(tmp_path / "repo")
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-flows")
    for name in ("TEST_FAIL_ALWAYS", "TEST_FAIL_PREPARE", "TEST_FLAKY_MARKER"):
        monkeypatch.delenv(name, raising=False)
    return root


def _task_runs(flow_state) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {r.name: r for r in runs}


def test_stage_order_comes_from_dvc(repo):
    from pipelines.orchestration.flows import dvc_stages

    assert dvc_stages(repo) == STAGES


def test_pipeline_runs_each_stage_as_a_task_then_registers_and_is_a_noop_twice(prefect_harness, repo):
    from mlflow import MlflowClient

    from pipelines.orchestration.flows import pipeline

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
    from pipelines.orchestration.flows import pipeline

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
    from pipelines.orchestration.flows import StageFailed, pipeline

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
    from pipelines.orchestration.flows import retrain_on_new_scans

    partial = repo / "data" / "incoming" / "scan-002"  # still landing: no READY marker
    partial.mkdir(parents=True)
    (partial / "photo.png").write_bytes(b"partial")
    start = time.perf_counter()
    out = retrain_on_new_scans(str(repo))
    assert out["status"] == "no-new-scans" and "nothing to do" in out["message"]
    assert time.perf_counter() - start < 20
    assert not (repo / "dvc.lock").exists()  # nothing ran


def test_retrain_catches_up_on_scans_that_failed_retrains_left_behind(prefect_harness, repo,
                                                                       monkeypatch):
    """Scans ingested by a retrain that then failed -- in prepare, or later in training -- are in
    the accepted store but not in what the last complete run trained on; the next retrain, with
    nothing new landed, must still retrain on them."""
    from pipelines.orchestration.flows import StageFailed, catch_up_reasons, pipeline, retrain_on_new_scans

    assert pipeline(str(repo), register_models=False)["stages"]  # the baseline run: all covered
    assert catch_up_reasons(repo) == []
    assert retrain_on_new_scans(str(repo))["status"] == "no-new-scans"
    landed = land_scans(repo, 2, seed=7)

    monkeypatch.setenv("TEST_FAIL_PREPARE", "1")  # 1. ingest succeeds, prepare fails
    state = retrain_on_new_scans(str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="injected failure in prepare"):
        state.result()
    assert sorted(p.name for p in (repo / "data/scans").iterdir() if p.is_dir()) == landed
    assert not any((repo / "data/incoming").iterdir())  # nothing is left to land
    (reason,) = catch_up_reasons(repo)
    assert reason.startswith("stage prepare last ran on data/scans")

    monkeypatch.delenv("TEST_FAIL_PREPARE")  # 2. nothing new; prepare passes, train@depth fails
    monkeypatch.setenv("TEST_FAIL_ALWAYS", "depth")
    state = retrain_on_new_scans(str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="train@depth"):
        state.result()
    reasons = catch_up_reasons(repo)
    assert any(r.startswith("stage train@depth last ran on data/prepared/conditions/depth")
               for r in reasons), reasons

    monkeypatch.delenv("TEST_FAIL_ALWAYS")  # 3. nothing new, nothing fails: it still retrains
    out = retrain_on_new_scans(str(repo))
    assert out["status"] == "retrained" and out["scans"] == [] and out["catch_up"]
    ran = {s["stage"] for s in out["pipeline"]["stages"] if s["status"] == "ran"}
    assert {"train@depth", "train@lighting", "evaluate"} <= ran
    pairs = (repo / "data/prepared/conditions/depth/pairs.jsonl").read_text().split()
    assert set(landed) <= set(pairs)
    assert {r["condition"] for r in out["pipeline"]["registered"]} == {"depth", "lighting"}
    assert catch_up_reasons(repo) == []
    assert retrain_on_new_scans(str(repo))["status"] == "no-new-scans"


def test_uncovered_reads_what_the_last_complete_run_left_behind_from_the_lock(tmp_path):
    import yaml

    from pipelines.registry.dvclock import stale_deps, uncovered

    def item(path, md5):
        return {"path": path, "hash": "md5", "md5": md5}

    assert uncovered(tmp_path, "data/scans", None, store_has_data=False) == []
    (no_lock,) = uncovered(tmp_path, "data/scans", "s1.dir", store_has_data=True)
    assert "never trained on" in no_lock
    lock = {"schema": "2.0", "stages": {
        "prepare": {"deps": [item("data/scans", "s1.dir")], "outs": [item("data/prepared/c", "p2.dir")]},
        "train": {"deps": [item("./data/prepared/c/", "p1.dir")], "outs": [item("models/c", "m1.dir")]},
        "evaluate": {"deps": [item("models/c", "m1.dir"), item("data/scans", "s1.dir")]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert stale_deps(tmp_path) == [{"stage": "train", "path": "data/prepared/c", "recorded": "p1.dir",
                                     "producer": "prepare", "produced": "p2.dir"}]
    assert len(uncovered(tmp_path, "data/scans", "s1.dir", store_has_data=True)) == 1
    reasons = uncovered(tmp_path, "data/scans", "s2.dir", store_has_data=True)
    assert [r.split(" last ran")[0] for r in reasons] == ["stage evaluate", "stage prepare", "stage train"]
    lock["stages"]["train"]["deps"][0]["md5"] = "p2.dir"
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert uncovered(tmp_path, "data/scans", "s1.dir", store_has_data=True) == []


def test_watch_emits_landed_event_for_complete_scans_only(prefect_harness, repo, capsys):
    from pipelines.orchestration.flows import EVENT, complete_scans, emit_landed

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
    from pipelines.orchestration.flows import EVENT, build_deployment

    dep = build_deployment(repo, cron="0 2 * * *")
    (trigger,) = dep.triggers
    assert trigger.expect == {EVENT}
    assert trigger.match.model_dump()["prefect.resource.id"] == "ctrlora.incoming.*"
    assert dep.parameters == {"repo_root": str(repo)}
    assert dep.schedules[0].schedule.cron == "0 2 * * *"
    dep = build_deployment(repo, interval=3600)
    assert dep.schedules[0].schedule.interval.total_seconds() == 3600
