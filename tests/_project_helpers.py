"""Shared helpers of the pipeline tests: a toy copy of this repository, and a JSON POST.

``toy_project`` copies the repository's tracked files (as a fresh clone has them) into ``root``,
links the repo's ``.venv`` (the graphs' commands run ``.venv/bin/python``), writes the given
params and commits it all in a new git repo: the real graphs, at a size a test affords."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[1]


def toy_project(root: Path, params: dict[str, Any], skip: Callable[[str], bool], message: str = "toy") -> Path:
    """``root`` as a committed copy of the repository's tracked files (but those ``skip`` names)
    with ``params`` as its params.yaml."""
    def git(*args: str, cwd: Path) -> str:
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout

    for rel in git("ls-files", cwd=REPO).split():
        if skip(rel):
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    (root / ".venv").symlink_to(REPO / ".venv")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, cwd=root)
    return root


def repro(root: Path, env: dict[str, str], timeout: float = 3000) -> str:
    """``make repro`` in ``root`` without the venv set-up (dvc repro, registration, the README
    report); its output, or a failed assertion showing its tail."""
    done = subprocess.run([sys.executable, "-m", "pipelines.orchestration.repro"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"repro failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def stages_ran(root: Path, since: float) -> dict[str, str]:
    """Stage -> status of every stage run ``root`` logged (``logs/stage_times.jsonl``) since ``since``."""
    rows = [json.loads(line) for line in (root / "logs/stage_times.jsonl").read_text().splitlines() if line.strip()]
    return {r["stage"]: r["status"] for r in rows if r["finished"] >= since}


def post_json(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    """POST ``body`` as JSON; (HTTP status, decoded JSON answer), error statuses included."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
