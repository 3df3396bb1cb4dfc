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
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipelines.settings import REPO_ROOT

TIMINGS_FILE = REPO_ROOT / "logs" / "stage_times.jsonl"


def read_params(*sections: str, path: Path | None = None) -> dict[str, Any]:
    """Return one section of params.yaml (or a merged dict of several, keyed by section)."""
    path = path or Path("params.yaml")
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
