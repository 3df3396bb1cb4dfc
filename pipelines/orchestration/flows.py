"""Prefect 3 flows over the DVC graph: run it, retrain when new scans land, serve on a schedule.

* ``pipeline`` -- one Prefect task run per DVC stage of ``dvc.yaml`` (foreach stages such as
  ``train_adapter@lighting`` are separate task runs), in DVC's topological order, each executed
  as ``dvc repro --single-item <stage>``; then the registry step (register + gate). DVC decides
  what reruns (an unchanged stage is a fast no-op); Prefect adds retries, logs and the UI. The
  graph is read from DVC (``dvc.repo.Repo(...).index``), never re-declared here.
* ``retrain_on_new_scans`` -- complete scans in ``data/incoming/`` (``READY`` marker) are ingested
  (``pipelines.orchestration.ingest``: validation, quarantine), ``dvc repro prepare`` recomputes the prepared
  data, and when a condition's dataset hash (``dvc.lock``) changed the ``pipeline`` flow runs.
  It also catches up: scans already in the accepted store (``data/scans/``) that the last complete
  run did not cover -- ingested by an earlier retrain that then failed or was interrupted -- make
  it retrain even when nothing new landed (:func:`catch_up_reasons`, read from ``dvc.lock``).
  Nothing landed and nothing left behind, or nothing changed: it ends at once and says so.

Commands::

    python -m pipelines.orchestration.flows run                 # the pipeline flow once
    python -m pipelines.orchestration.flows retrain             # the retrain flow once
    python -m pipelines.orchestration.flows serve [--cron "0 2 * * *" | --interval 3600]
    python -m pipelines.orchestration.flows watch [--poll 10]   # emits dental.scans.landed

``serve`` serves ``retrain_on_new_scans`` with the schedule (CLI, else params ``schedule``) and a
``DeploymentEventTrigger`` on the event ``dental.scans.landed`` that ``watch`` emits. Both need a
Prefect server both processes talk to (``PREFECT_API_URL``); see docs/mlops.md.

Params (each key required; the values live only in params.yaml): ``flows: {retries,
retry_delay_seconds, prepare_stage}``, ``schedule: {cron, interval, poll_seconds}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.registry.dvclock import dataset_hashes, uncovered
from pipelines.settings import INCOMING, PATHS, REPO_ROOT, load_params

EVENT = "dental.scans.landed"
RESOURCE_ID = "ctrlora.incoming"
READY = "READY"
FLOWS_KEYS = ("retries", "retry_delay_seconds", "prepare_stage")
SCHEDULE_KEYS = ("cron", "interval", "poll_seconds")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the stage's own error output."""

    def __init__(self, stage: str, returncode: int, output: str):
        self.stage, self.returncode, self.output = stage, returncode, output
        super().__init__(f"DVC stage {stage!r} failed (exit {returncode}):\n{output}")


# --------------------------------------------------------------------------- params / DVC helpers

def _section(root: Path, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """params.yaml ``name`` of the repo at ``root``, with exactly ``keys`` (params states every
    value; there is no second default here)."""
    from ctrlora.params import checked_section

    section = load_params(root).get(name)
    if not isinstance(section, dict):
        raise KeyError(f"{root / 'params.yaml'}: no `{name}` section (it needs {list(keys)})")
    return checked_section(f"{name} (in {root / 'params.yaml'})", section, keys)


def flows_params(root: Path) -> dict[str, Any]:
    return _section(root, "flows", FLOWS_KEYS)


def schedule_params(root: Path) -> dict[str, Any]:
    return _section(root, "schedule", SCHEDULE_KEYS)


def repo_paths(root: Path) -> dict[str, Any]:
    """The ``paths`` section of the repo at ``root`` over this checkout's (a repo may omit it)."""
    return {**PATHS, **(load_params(root).get("paths") or {})}


def store_hash(root: Path, store: str) -> str | None:
    """DVC's current hash of the accepted store ``store`` (relative to ``root``) as a stage
    dependency -- what ``dvc repro`` compares with ``dvc.lock``; None when the folder does not
    exist or no stage depends on it."""
    from dvc.repo import Repo

    folder = (root / store).resolve()
    if not folder.is_dir():
        return None
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if Path(dep.fs_path).resolve() == folder:
                    return dep.get_hash().value
    return None


def catch_up_reasons(root: Path) -> list[str]:
    """Why the accepted store is not covered by the last complete run (``[]``: it is): scans an
    earlier retrain ingested but did not carry through (it failed or was interrupted after
    ingest, after prepare, or in any later stage). See :func:`pipelines.registry.dvclock.uncovered`."""
    store = str(repo_paths(root)["scans"])
    folder = root / store
    has_scans = folder.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                        for p in folder.iterdir())
    return uncovered(root, store, store_hash(root, store), has_scans)


def dvc_stages(root: str | Path, dvc_file: str = "dvc.yaml") -> list[str]:
    """Every stage of one DVC pipeline file (default: the production graph ``dvc.yaml``, not the
    research graph beside it), foreach entries expanded, dependencies first; ties broken by name
    so the order is stable."""
    import networkx as nx
    from dvc.repo import Repo

    root = Path(root).resolve()

    def name(stage) -> str:  # as `dvc repro` run in ``root`` wants it
        rel = os.path.relpath(stage.path, root)
        return stage.name if rel == "dvc.yaml" else f"{rel}:{stage.name}"

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges: stage -> stage it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=name)
        return [name(s) for s in order if os.path.relpath(s.path, root) == dvc_file]


def _env() -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(),
                          capture_output=True, text=True)


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def complete_scans(incoming: Path) -> list[str]:
    """Scan folders in ``incoming`` that carry the ``READY`` marker (landing protocol)."""
    if not incoming.is_dir():
        return []
    return sorted(p.name for p in incoming.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / READY).is_file())


# --------------------------------------------------------------------------- tasks

def _classify(output: str) -> str:
    if "didn't change, skipping" in output:
        return "unchanged"
    if "is cached - skipping run" in output:
        return "restored"
    return "ran"


@task(name="dvc-stage", cache_policy=NO_CACHE)
def run_stage(repo_root: str, stage: str) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``; DVC skips it when nothing it depends on changed."""
    logger = get_run_logger()
    start = time.perf_counter()
    proc = _dvc(Path(repo_root), "repro", "--single-item", stage)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        logger.error("stage %s failed:\n%s", stage, _tail(output))
        raise StageFailed(stage, proc.returncode, _tail(output))
    status = _classify(output)
    seconds = round(time.perf_counter() - start, 2)
    logger.info("stage %s: %s (%.1f s)", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": seconds}


@task(name="dvc-repro-target", cache_policy=NO_CACHE)
def repro_target(repo_root: str, target: str) -> str:
    """``dvc repro <target>`` (with its upstream stages)."""
    proc = _dvc(Path(repo_root), "repro", target)
    if proc.returncode != 0:
        raise StageFailed(target, proc.returncode, _tail(proc.stdout + proc.stderr))
    return _classify(proc.stdout + proc.stderr)


@task(name="register-and-promote", cache_policy=NO_CACHE)
def register_task(repo_root: str) -> list[dict[str, Any]]:
    from pipelines.registry.register import register_all

    logger = get_run_logger()
    out = register_all(Path(repo_root), log=logger.info)
    if out is None:
        return []
    results, errors = out
    if errors:
        raise RuntimeError("registration failed for: " + "; ".join(errors))
    return [r.as_dict() for r in results]


@task(name="ingest-incoming", cache_policy=NO_CACHE)
def ingest_task(repo_root: str) -> dict[str, Any]:
    """``python -m pipelines.orchestration.ingest --json``: accepted scans → ``paths.scans``, bad ones → quarantine."""
    root = Path(repo_root)
    proc = subprocess.run([sys.executable, "-m", "pipelines.orchestration.ingest", "--repo", str(root),
                           "--json"], cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ingest failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    text = proc.stdout
    try:
        return json.loads(text[text.index("{"):])
    except ValueError as exc:
        raise RuntimeError(f"ingest printed no JSON report:\n{_tail(text)}") from exc


# --------------------------------------------------------------------------- flows

@flow(name="ctrlora-pipeline")
def pipeline(repo_root: str = ".", register_models: bool = True, retries: int | None = None,
             retry_delay_seconds: float | None = None) -> dict[str, Any]:
    """Every DVC stage as its own task run (dependencies first), then register + promote."""
    logger = get_run_logger()
    root = Path(repo_root).resolve()
    cfg = flows_params(root)
    retries = int(cfg["retries"] if retries is None else retries)
    delay = float(cfg["retry_delay_seconds"] if retry_delay_seconds is None else retry_delay_seconds)
    stages = dvc_stages(root)
    logger.info("DVC graph in %s: %s", root, " → ".join(stages))
    results = []
    for stage in stages:
        runner = run_stage.with_options(retries=retries, retry_delay_seconds=delay,
                                        task_run_name=f"dvc-stage[{stage}]")
        results.append(runner(str(root), stage))  # raises StageFailed after the last retry
    ran = [r["stage"] for r in results if r["status"] != "unchanged"]
    logger.info("stages that ran: %s", ", ".join(ran) if ran else "none (everything up to date)")
    start = time.perf_counter()
    registered = register_task(str(root)) if register_models else []
    seconds = round(time.perf_counter() - start, 2)
    return {"stages": results, "registered": registered, "register_seconds": seconds}


@task(name="catch-up-check", cache_policy=NO_CACHE)
def catch_up_task(repo_root: str) -> list[str]:
    """:func:`catch_up_reasons` as a task run (its answer shows in the UI)."""
    reasons = catch_up_reasons(Path(repo_root))
    for reason in reasons:
        get_run_logger().info("not covered by the last complete run: %s", reason)
    return reasons


@flow(name="ctrlora-retrain-on-new-scans")
def retrain_on_new_scans(repo_root: str = ".", run_pipeline: bool = True) -> dict[str, Any]:
    """Ingest complete scans from data/incoming; retrain when a dataset hash changed or when the
    accepted store holds scans the last complete run did not cover."""
    logger = get_run_logger()
    root = Path(repo_root).resolve()
    incoming = str(repo_paths(root)["incoming"])
    landed = complete_scans(root / incoming)
    report = None
    timing: dict[str, float] = {}
    if landed:
        logger.info("%d complete scan(s) landed: %s", len(landed), ", ".join(landed))
        start = time.perf_counter()
        report = ingest_task(str(root))
        timing["ingest"] = round(time.perf_counter() - start, 2)
        logger.info("ingest: accepted %s, quarantined %s", report.get("accepted"),
                    report.get("quarantined"))
    elif not catch_up_task(str(root)):
        msg = (f"no complete scans in {incoming}/ (a scan counts once its {READY} marker exists) "
               "and the accepted store is covered by the last complete run: nothing to do")
        logger.info(msg)
        return {"status": "no-new-scans", "message": msg, "scans": []}
    before = dataset_hashes(root)
    cfg = flows_params(root)
    start = time.perf_counter()
    repro_target.with_options(retries=int(cfg["retries"]),
                              retry_delay_seconds=float(cfg["retry_delay_seconds"]))(
        str(root), str(cfg["prepare_stage"]))
    timing["prepare"] = round(time.perf_counter() - start, 2)
    after = dataset_hashes(root)
    changed = sorted(c for c in after if before.get(c) != after[c])
    behind = catch_up_task(str(root))  # after prepare: what the later stages have not run on
    if not changed and not behind:
        msg = "dataset hashes unchanged after ingest + prepare: no retraining needed"
        logger.info(msg)
        return {"status": "unchanged", "message": msg, "scans": landed, "ingest": report}
    if changed:
        logger.info("dataset hash changed for: %s", ", ".join(changed))
    if behind:
        logger.info("catching up: %d stage input(s) behind the accepted store", len(behind))
    result = pipeline(str(root)) if run_pipeline else None
    return {"status": "retrained" if run_pipeline else "changed", "changed": changed,
            "hashes": {c: {"before": before.get(c), "after": after[c]} for c in changed},
            "catch_up": behind, "scans": landed, "ingest": report, "pipeline": result, "timing": timing}


def retrain_times(out: dict[str, Any], total: float) -> dict[str, Any] | None:
    """The wall-time record of one retrain (``paths.retrain_times``, the README's table): ingest,
    prepare, each DVC stage that ran (DVC's own overhead included), registration, the rest
    (Prefect, hashing) and the total; None when nothing was retrained."""
    pipe = out.get("pipeline")
    if not pipe:
        return None
    rows = [{"stage": "ingest", "seconds": out["timing"].get("ingest", 0.0)},
            {"stage": "prepare", "seconds": out["timing"]["prepare"]}]
    rows += [{"stage": r["stage"], "seconds": r["seconds"]} for r in pipe["stages"] if r["status"] != "unchanged"]
    rows.append({"stage": "register (gate comparisons included)", "seconds": pipe["register_seconds"]})
    rest = total - sum(r["seconds"] for r in rows)
    rows.append({"stage": "other (Prefect, DVC checks of unchanged stages, hashing)", "seconds": round(rest, 2)})
    return {"stages": rows, "total_seconds": round(total, 1), "landed": len(out.get("scans") or []),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch threads per stage from params"}


# --------------------------------------------------------------------------- serve / watch

def build_deployment(root: Path, cron: str | None = None, interval: float | None = None,
                     name: str = "retrain-on-new-scans"):
    """The retrain deployment: schedule (cron or interval) + trigger on ``dental.scans.landed``."""
    from datetime import timedelta

    from prefect.events import DeploymentEventTrigger

    trigger = DeploymentEventTrigger(
        name="scans-landed",
        expect={EVENT},
        match={"prefect.resource.id": f"{RESOURCE_ID}.*"},
        parameters={"repo_root": str(root)},
    )
    return retrain_on_new_scans.to_deployment(
        name=name,
        cron=cron,
        interval=timedelta(seconds=float(interval)) if (interval and not cron) else None,
        parameters={"repo_root": str(root)},
        triggers=[trigger],
        tags=["ctrlora", "retrain"],
    )


def emit_landed(root: Path, scans: list[str]):
    """Emit ``dental.scans.landed`` for ``scans`` (returns the Event, or None if not sent)."""
    from prefect.events import emit_event

    incoming = root / repo_paths(root)["incoming"]
    return emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"{RESOURCE_ID}.{root.name}",
                  "prefect.resource.name": str(incoming)},
        payload={"scans": scans, "incoming": str(incoming)},
    )


def watch(root: Path, poll_seconds: float, once: bool = False) -> int:
    """Poll data/incoming; emit one event per batch of newly complete scans."""
    seen: set[str] = set()
    incoming = root / repo_paths(root)["incoming"]
    print(f"watching {incoming} every {poll_seconds:g} s for complete scans ({READY} marker)")
    while True:
        current = set(complete_scans(incoming))
        new = sorted(current - seen)
        if new:
            event = emit_landed(root, new)
            state = "emitted" if event is not None else "NOT emitted (no Prefect API?)"
            print(f"{EVENT} {state}: {', '.join(new)}", flush=True)
        seen = current  # ingested scans leave incoming/; a re-landed id triggers again
        if once:
            return 0
        time.sleep(poll_seconds)


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.orchestration.flows", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT,
                        help=f"project root (default: {REPO_ROOT})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run the pipeline flow once")
    sub.add_parser("retrain", help="run the retrain-on-new-scans flow once")
    p = sub.add_parser("serve", help="serve the retrain flow on a schedule + the scans-landed trigger")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cron", help='cron schedule, e.g. "0 2 * * *" (default: params schedule.cron)')
    g.add_argument("--interval", type=float, help="seconds between runs (default: params schedule.interval)")
    p = sub.add_parser("watch", help=f"emit {EVENT} when complete scans appear in {INCOMING}/")
    p.add_argument("--poll", type=float, default=None, help="seconds between polls (default: params)")
    p.add_argument("--once", action="store_true", help="check once and exit")
    args = parser.parse_args(argv)
    root = args.repo.resolve()

    if args.cmd == "run":
        print(json.dumps(pipeline(str(root)), indent=1, default=str))
        return 0
    if args.cmd == "retrain":
        start = time.perf_counter()
        out = retrain_on_new_scans(str(root))
        total = time.perf_counter() - start
        print(out.get("message") or json.dumps(out, indent=1, default=str))
        record = retrain_times(out, total)
        if record is not None:
            target = root / repo_paths(root)["retrain_times"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(record, indent=1) + "\n")
            print("\nretrain wall time per part:")
            for row in record["stages"]:
                print(f"  {row['stage']:<58} {row['seconds']:8.1f} s")
            print(f"  {'total':<58} {total:8.1f} s  -> {target}")
        return 0
    sched = schedule_params(root)
    if args.cmd == "serve":
        from prefect import serve

        if not _api_url():
            print("note: PREFECT_API_URL is not set -- serving against a temporary local server; "
                  "the schedule works but `watch` in another process cannot reach this trigger. "
                  "Start `prefect server start` and export PREFECT_API_URL (docs/mlops.md).",
                  file=sys.stderr)
        cron = args.cron if (args.cron or args.interval) else sched.get("cron")
        interval = args.interval if (args.cron or args.interval) else sched.get("interval")
        deployment = build_deployment(root, cron=cron, interval=interval)
        print(f"serving {deployment.name}: " + (f"cron {cron!r}" if cron else f"every {interval} s")
              + f" + trigger on {EVENT}")
        serve(deployment)
        return 0
    if args.cmd == "watch":
        if not _api_url():
            print(f"watch: PREFECT_API_URL is not set; {EVENT} would go nowhere. Start a Prefect "
                  "server (`prefect server start`) and export PREFECT_API_URL "
                  "(e.g. http://127.0.0.1:4200/api).", file=sys.stderr)
            return 2
        poll = float(args.poll if args.poll is not None else sched["poll_seconds"])
        return watch(root, poll, once=args.once)
    return 2


if __name__ == "__main__":
    sys.exit(main())
