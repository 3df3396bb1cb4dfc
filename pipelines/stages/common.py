"""Small shared helpers for DVC stage entry points: read params sections and the artefact
paths, time the stage.

Every stage entry is ``python -m pipelines.stages.<entry>`` (the foundation graph's
``pipelines.foundation.<entry>``, the research graph's ``pipelines.research.<entry>``) and looks
like::

    def main() -> None:
        cfg, paths = read_params("train_base"), artefact_paths()
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

from pipelines.settings import REPO_ROOT, read_params

__all__ = ["read_params", "artefact_paths", "timed_stage", "checkpoint_dir", "clear_checkpoints",
           "resolve_backbone", "backbone_part", "RECORD_NAME", "write_curve", "main_process"]

TIMINGS_FILE = REPO_ROOT / "logs" / "stage_times.jsonl"


def _resolve(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _resolve(v) for k, v in node.items()}
    return REPO_ROOT / node  # an absolute path stays as it is


def artefact_paths(path: Path | None = None) -> dict[str, Any]:
    """params.yaml ``paths`` with every entry resolved against the repo root (nested sections
    such as ``reports`` and ``metrics`` stay dicts)."""
    return _resolve(read_params("paths", path=path))


def main_process() -> bool:
    """False in the other processes of an ``accelerate launch`` / torchrun run (global rank > 0):
    they train their share and leave every output (models, curves, timings) to rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


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
        if main_process():
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


RECORD_NAME = "backbone.json"  # the ``backbone`` stage's record of the directory the graph reads


def resolve_backbone(out_dir: Path) -> Path:
    """The backbone directory the ``backbone`` stage recorded in ``<out_dir>/backbone.json`` (the
    foundation's tiny backbone, or a local SD 1.5): a relative path is relative to the record's
    folder, ``~`` expands. A directory without a record is a backbone itself."""
    rec = Path(out_dir) / RECORD_NAME
    if not rec.exists():
        return Path(out_dir)
    where = Path(json.loads(rec.read_text())["path"]).expanduser()
    return where if where.is_absolute() else (Path(out_dir) / where).resolve()


def backbone_part(out_dir: Path, root: Path = REPO_ROOT) -> Path:
    """What the registry stores for a version's backbone: the backbone itself when it lies inside
    the repository (the shipped tiny one: a served model must not depend on a checkout), else the
    record (a local SD 1.5 of several GB is referenced, not copied). ``root``: that repository."""
    src = resolve_backbone(out_dir)
    return src if src.resolve().is_relative_to(Path(root).resolve()) else Path(out_dir)


def write_curve(history: list[dict], path: Path, keys: list[str] | tuple[str, ...] = ("loss",)) -> None:
    """A loss curve as CSV (step + the given columns; empty where a step lacks one) for DVC plots."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["step," + ",".join(k.replace("/", "_") for k in keys)]
    for r in history:
        lines.append(f"{r['step']}," + ",".join(f"{r[k]:.6f}" if k in r else "" for k in keys))
    path.write_text("\n".join(lines) + "\n")
