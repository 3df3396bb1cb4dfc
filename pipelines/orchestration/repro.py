"""The README's main command: ``dvc repro`` on the embedded default, then the registry step, then
the README's result tables.

Registration runs here, outside every cached DVC stage: DVC may restore a cached stage without
running it, and registration must still see (and idempotently register) its outputs. When stages
ran, their wall times are written to ``reports/repro_times.json`` (committed with the metrics, so
the README's timing table names the run its figures come from).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from pipelines.orchestration import report
from pipelines.registry import register
from pipelines.settings import REPO_ROOT, REPRO_TIMES
from pipelines.stages.common import TIMINGS_FILE


def _stage_times(since: float) -> list[dict]:
    if not TIMINGS_FILE.exists():
        return []
    rows = [json.loads(line) for line in TIMINGS_FILE.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("finished", 0) >= since]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.time()
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    rc = subprocess.call([os.path.join(bindir, "dvc"), "repro", *argv], cwd=REPO_ROOT, env=env)
    if rc != 0:
        print(f"dvc repro failed (exit {rc})", file=sys.stderr)
        return rc
    rc = register.main(["--repo", str(REPO_ROOT)])
    if rc:
        return rc
    times = _stage_times(start)
    total = time.time() - start
    print("\nper-stage wall time (stages that ran in this repro):")
    for row in times:
        print(f"  {row['stage']:<28} {row['seconds']:8.1f} s  {row['status']}")
    if not times:
        print("  (none ran: everything was up to date)")
    print(f"  {'total':<28} {total:8.1f} s")
    if times:
        record = {"stages": [{"stage": r["stage"], "seconds": r["seconds"]} for r in times],
                  "total_seconds": round(total, 1),
                  "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch threads per stage from params"}
        target = REPO_ROOT / REPRO_TIMES
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=1) + "\n")
    report.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
