"""Real servers, end to end: ``prefect server start`` and ``mlflow server`` (sqlite backend, local
artifact root) run as processes on free localhost ports; ``python -m pipelines.orchestration.flows serve`` serves
the retrain deployment and ``python -m pipelines.orchestration.flows watch`` watches the toy project's incoming
folder (tests/_flows_helpers.py), both as processes. Real scans land; the test then reads, from
the servers' REST APIs only: the ``dental.scans.landed`` event, the deployment run its trigger
started (linked to that event by the automation's own event), the versions the run registered
through the tracking server and the gate's decision on them. Then two processes register on one
model at the same moment: one version, one champion.

Every process is stopped at the end, also when the test fails. ``make servers-e2e`` runs this
file alone and prints what it saw (``-s``)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from _flows_helpers import CONDITIONS, land_scans, make_toy_repo

httpx = pytest.importorskip("httpx")
pytest.importorskip("prefect")
pytest.importorskip("mlflow")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT = 240   # both servers, on a loaded 2-core machine (about 30 s unloaded)
RUN_TIMEOUT = 420     # event -> deployment run -> ingest, prepare, 5 stages, registration
DEPLOYMENT = "ctrlora-retrain-on-new-scans/retrain-on-new-scans"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The processes of one test module, each in its own process group, logging to a file."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.prefect = f"http://127.0.0.1:{_free_port()}"
        self.mlflow = f"http://127.0.0.1:{_free_port()}"
        quiet = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.server_env = {**os.environ, **quiet, "PREFECT_HOME": str(root / "prefect-server"),
                           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        self.server_env.pop("PREFECT_API_URL", None)
        # what every client process gets: the two servers, nothing of this machine's defaults
        self.client_env = {**os.environ, **quiet, "PREFECT_HOME": str(root / "prefect-client"),
                           "PREFECT_API_URL": f"{self.prefect}/api",
                           "MLFLOW_TRACKING_URI": self.mlflow,
                           "MLFLOW_EXPERIMENT_NAME": "servers-e2e",
                           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str, lines: int = 40) -> str:
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def logs(self) -> str:
        return "\n".join(f"--- {n}.log\n{self.log(n)}" for n in self.procs)

    def wait(self, what: str, probe: Callable[[], Any], timeout: float, poll: float = 1.0):
        """``probe()``'s first truthy value; fails with every log when a process died or time
        ran out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = probe()
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                value = None
            if value:
                return value
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:g} s"
                pytest.fail(f"waiting for {what}: {why}\n{self.logs()}")
            time.sleep(poll)

    def stop(self) -> None:
        for proc in self.procs.values():  # SIGTERM to every group first, then wait
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    s = Stack(root)
    try:
        prefect_port = s.prefect.rsplit(":", 1)[1]
        s.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", prefect_port, "--no-ui"], s.server_env, cwd=root)
        mlflow_port = s.mlflow.rsplit(":", 1)[1]
        s.start("mlflow-server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1",
                                  "--port", mlflow_port, "--workers", "1",
                                  "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                  "--artifacts-destination", str(root / "mlartifacts")],
                s.server_env, cwd=root)
        start = time.monotonic()
        s.wait("the Prefect server", lambda: httpx.get(f"{s.prefect}/api/health").json() is True,
               START_TIMEOUT)
        s.wait("the MLflow server", lambda: httpx.get(f"{s.mlflow}/health").status_code == 200,
               START_TIMEOUT)
        print(f"\nservers up in {time.monotonic() - start:.0f} s: Prefect {s.prefect}/api, "
              f"MLflow {s.mlflow}")
        yield s
    finally:
        s.stop()
        alive = [n for n, p in s.procs.items() if p.poll() is None]
        assert not alive, f"still running after stop: {alive}"


def _events(s: Stack, **flt) -> list[dict]:
    resp = httpx.post(f"{s.prefect}/api/events/filter", json={"filter": flt, "limit": 50})
    resp.raise_for_status()
    return resp.json()["events"]


def _related(event: dict, role: str) -> str | None:
    for rel in event.get("related") or []:
        if rel.get("prefect.resource.role") == role:
            return rel["prefect.resource.id"].rsplit(".", 1)[1]
    return None


def _mlflow(s: Stack, endpoint: str, **params) -> dict:
    resp = httpx.get(f"{s.mlflow}/api/2.0/mlflow/{endpoint}", params=params)
    resp.raise_for_status()
    return resp.json()


def _versions(s: Stack, model: str) -> list[dict]:
    found = _mlflow(s, "model-versions/search", filter=f"name='{model}'").get("model_versions", [])
    return sorted(found, key=lambda v: int(v["version"]))


def _tags(obj: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in obj.get("tags") or []}


def test_landed_scans_trigger_the_served_retrain_which_registers_through_the_tracking_server(
        stack, tmp_path):
    from pipelines.orchestration.flows import EVENT
    from pipelines.registry.dvclock import dataset_hash_from_lock

    repo = make_toy_repo(tmp_path / "repo")
    py = sys.executable
    # the schedule is a yearly cron: the only run in this test is the one the event starts
    stack.start("serve", [py, "-m", "pipelines.orchestration.flows", "--repo", str(repo), "serve",
                          "--cron", "0 0 1 1 *"], stack.client_env)
    stack.start("watch", [py, "-m", "pipelines.orchestration.flows", "--repo", str(repo), "watch", "--poll", "1"],
                stack.client_env)
    deployment = stack.wait("the served deployment", lambda: httpx.get(
        f"{stack.prefect}/api/deployments/name/{DEPLOYMENT}").raise_for_status().json(), 120)
    stack.wait("the scans-landed automation", lambda: any(
        a["name"] == "scans-landed" for a in httpx.post(
            f"{stack.prefect}/api/automations/filter", json={}).json()), 60)
    stack.wait("the watcher", lambda: "watching" in stack.log("watch"), 60)

    landed = land_scans(repo, 2, seed=11)
    t0 = time.monotonic()
    event = stack.wait(f"the {EVENT} event", lambda: [
        e for e in _events(stack, event={"name": [EVENT]}) if e["payload"]["scans"] == landed], 60)[0]
    assert event["resource"]["prefect.resource.id"] == f"ctrlora.incoming.{repo.name}"
    # the automation's own record of what it did: this event made it start this flow run
    executed = stack.wait("the trigger's run-deployment action", lambda: [
        e for e in _events(stack, event={"name": ["prefect.automation.action.executed"]})
        if _related(e, "triggering-event") == event["id"]], 60)[0]
    run_id = _related(executed, "flow-run")
    assert _related(executed, "target") == deployment["id"] and run_id

    def finished():
        run = httpx.get(f"{stack.prefect}/api/flow_runs/{run_id}").raise_for_status().json()
        if run["state_type"] in ("FAILED", "CRASHED", "CANCELLED"):
            pytest.fail(f"flow run {run_id} ended {run['state_type']}: {run['state']['message']}\n"
                        f"{stack.logs()}")
        return run if run["state_type"] == "COMPLETED" else None
    run = stack.wait(f"flow run {run_id} to complete", finished, RUN_TIMEOUT, poll=2)
    seconds = time.monotonic() - t0
    assert run["deployment_id"] == deployment["id"]
    assert run["created_by"]["type"] == "AUTOMATION" and run["parameters"] == {"repo_root": str(repo)}
    assert sorted(p.name for p in (repo / "data/scans").iterdir() if p.is_dir()) == landed

    print(f"{EVENT} {event['id']} (scans {', '.join(landed)}) -> deployment run {run['name']} "
          f"{run_id}, completed {seconds:.0f} s after landing")
    for c in CONDITIONS:
        model = f"ctrlora-{c}"
        (version,) = _versions(stack, model)
        tags = _tags(version)
        assert tags["dataset_hash"] == dataset_hash_from_lock(repo, c)
        assert tags["gate"] == "champion" and "first version" in tags["gate_reason"]
        aliases = {a["alias"]: a["version"] for a in
                   _mlflow(stack, "registered-models/get", name=model)["registered_model"]["aliases"]}
        assert aliases == {"champion": version["version"]}
        reg_run = _mlflow(stack, "runs/get", run_id=version["run_id"])["run"]
        assert _tags(reg_run["data"])["gate"] == "champion"
        print(f"{model} v{version['version']} aliases {sorted(aliases)} run {version['run_id']} "
              f"dataset {tags['dataset_hash']}; gate: {tags['gate_reason']}")


RACER = """\
import json, sys, time
from pathlib import Path
from pipelines.registry.registration import register_adapter
parts, go, ready, result = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[5])
ready.write_text("")
while not go.exists():
    time.sleep(0.005)
out = []
for model, adapter in (("race", "shared"), ("race-two", sys.argv[4])):
    r = register_adapter(model, parts / adapter, dataset_hash="d" * 32 + ".dir", base_hash="f" * 64,
                         backbone_dir=parts / "backbone", base_dir=parts / "base",
                         metrics={"fidelity": 0.5}, git_commit="race", dataset_path=parts)
    out.append({"model": r.model_name, "version": r.version, "created": r.created,
                "decision": r.decision, "champion": r.champion})
result.write_text(json.dumps(out))
"""


def test_two_registrations_racing_on_one_model_make_one_version_and_one_champion(stack, tmp_path):
    """Two processes start registering at the same instant: the same adapter on ``ctrlora-race``
    (one version, both told its number), then each its own adapter on ``ctrlora-race-two`` (two
    versions, exactly one champion)."""
    parts = tmp_path / "parts"
    for d, files in {"backbone/unet": {"config.json": "{}"}, "base": {"config.json": "{}"},
                     "shared": {"adapter_model.safetensors": "same"},
                     "own-a": {"adapter_model.safetensors": "a"},
                     "own-b": {"adapter_model.safetensors": "b"}}.items():
        (parts / d).mkdir(parents=True)
        for name, text in files.items():
            (parts / d / name).write_text(text)
    go = tmp_path / "go"
    for who in ("a", "b"):
        stack.start(f"racer-{who}", [sys.executable, "-c", RACER, str(parts), str(go),
                                     str(tmp_path / f"ready-{who}"), f"own-{who}",
                                     str(tmp_path / f"result-{who}.json")], stack.client_env)
    stack.wait("both racers to be ready", lambda: all(
        (tmp_path / f"ready-{w}").exists() for w in "ab"), 120, poll=0.1)
    go.write_text("")
    results = []
    for who in ("a", "b"):
        proc = stack.procs.pop(f"racer-{who}")
        assert proc.wait(timeout=300) == 0, stack.log(f"racer-{who}")
        results.append(json.loads((tmp_path / f"result-{who}.json").read_text()))

    same = [r[0] for r in results]
    (version,) = _versions(stack, "ctrlora-race")
    assert {r["version"] for r in same} == {version["version"]}
    assert sorted(r["created"] for r in same) == [False, True]
    aliases = _mlflow(stack, "registered-models/get", name="ctrlora-race")["registered_model"]["aliases"]
    assert aliases == [{"alias": "champion", "version": version["version"]}]

    own = _versions(stack, "ctrlora-race-two")
    assert len(own) == 2
    gates = sorted(_tags(v)["gate"] for v in own)
    assert gates == ["challenger", "champion"]
    champion = next(v["version"] for v in own if _tags(v)["gate"] == "champion")
    aliases = {a["alias"]: a["version"] for a in _mlflow(
        stack, "registered-models/get", name="ctrlora-race-two")["registered_model"]["aliases"]}
    assert aliases["champion"] == champion and aliases.get("challenger") != champion
    names = [m["name"] for m in _mlflow(stack, "registered-models/search", max_results=100)
             ["registered_models"]]
    assert not [n for n in names if n.startswith("_lock.")]  # every lock was released
    print(f"race on ctrlora-race: both got v{version['version']}; ctrlora-race-two: "
          f"v{champion} champion, the other {[v['version'] for v in own if v['version'] != champion]} "
          "challenger")
