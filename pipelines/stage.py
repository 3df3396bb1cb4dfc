"""Small shared helpers for DVC stage entry points: read one params section, time the stage.

Every stage entry is ``python -m pipelines.<stage>`` and looks like::

    def main() -> None:
        cfg = read_params("train_base")
        with timed_stage("train_base"):
            ...
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipelines.settings import REPO_ROOT

TIMINGS_FILE = REPO_ROOT / "logs" / "stage_times.jsonl"


def read_params(*sections: str, path: Path | None = None) -> dict[str, Any]:
    """Return one section of params.yaml (or a merged dict of several, keyed by section)."""
    path = Path(path or os.environ.get("CTRLORA_PARAMS", "params.yaml"))
    with open(path) as fh:
        params = yaml.safe_load(fh) or {}
    missing = [s for s in sections if s not in params]
    if missing:
        raise KeyError(f"{path}: missing section(s) {missing}; present: {sorted(params)}")
    if len(sections) == 1:
        return params[sections[0]]
    return {s: params[s] for s in sections}


@contextlib.contextmanager
def timed_stage(name: str) -> Iterator[None]:
    """Print and record the wall time of one stage run (``logs/stage_times.jsonl``)."""
    start = time.perf_counter()
    print(f"[{name}] started", flush=True)
    status = "failed"
    try:
        yield
        status = "ok"
    finally:
        seconds = time.perf_counter() - start
        print(f"[{name}] {status} in {seconds:.1f} s", flush=True)
        try:
            TIMINGS_FILE.parent.mkdir(parents=True, exist_ok=True)
            with open(TIMINGS_FILE, "a") as fh:
                fh.write(json.dumps({"stage": name, "seconds": round(seconds, 2), "status": status,
                                     "finished": time.time()}) + "\n")
        except OSError:
            pass


def checkpoint_dir(stage: str, params: dict[str, Any]) -> Path:
    """Where a stage keeps resumable checkpoints: outside DVC outputs (DVC deletes those before a
    run), keyed by the stage's parameters so a changed configuration never resumes a stale run.
    Stages delete it after a successful run (:func:`clear_checkpoints`)."""
    import hashlib

    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return REPO_ROOT / "checkpoints" / stage / key


def clear_checkpoints(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def resolve_backbone(out_dir: Path) -> Path:
    """The backbone directory the ``backbone`` stage produced: the tiny preset itself, or the
    local SD 1.5 directory it recorded in ``backbone.json``."""
    record = Path(out_dir) / "backbone.json"
    if record.exists():
        return Path(json.loads(record.read_text())["path"])
    return Path(out_dir)


def write_curve(history: list[dict], path: Path, keys: list[str] | tuple[str, ...] = ("loss",)) -> None:
    """A loss curve as CSV (step + the given columns; empty where a step lacks one) for DVC plots."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["step," + ",".join(k.replace("/", "_") for k in keys)]
    for r in history:
        lines.append(f"{r['step']}," + ",".join(f"{r[k]:.6f}" if k in r else "" for k in keys))
    path.write_text("\n".join(lines) + "\n")
