"""Register every trained adapter in MLflow and apply the promotion gate (after ``dvc repro``).

Runs outside every cached DVC stage -- DVC may restore a cached stage without running it, and
registration must still see its outputs. Idempotent: an adapter already registered with the same
adapter hash and dataset hash is reported, not registered again.

    .venv/bin/python -m pipelines.register [--repo DIR] [--dry-run]

Looks for adapters in ``models/adapters/<c>/`` (new conditions) and ``models/base/adapters/<c>/``
(base conditions), reads each one's dataset hash from ``dvc.lock``, the metrics from
``metrics/evaluate.json`` and the gate from ``params.yaml`` section ``register``. When the graph
has not produced those outputs yet in this checkout it says so and exits 0 without touching the
registry.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import pipelines  # noqa: F401  (applies tool defaults)

BACKBONE = "models/backbone"
BASE = "models/base"
ADAPTER_ROOTS = ("models/base/adapters", "models/adapters")  # later roots register later (newer)
METRICS = "metrics/evaluate.json"
DEFAULT_REGISTER = {"gate": {"metric": "fidelity", "mode": "max", "min_delta": 0.0}}


@dataclass
class Candidate:
    condition: str
    adapter_dir: Path


def register_params(root: Path) -> dict[str, Any]:
    """params.yaml section ``register`` merged over the defaults (the section may be absent)."""
    path = root / "params.yaml"
    params = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    section = params.get("register") or {}
    return {**DEFAULT_REGISTER, **section,
            "gate": {**DEFAULT_REGISTER["gate"], **(section.get("gate") or {})}}


def find_adapters(root: Path) -> list[Candidate]:
    found = []
    for rel in ADAPTER_ROOTS:
        base = root / rel
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            if (d / "adapter_model.safetensors").is_file():
                found.append(Candidate(d.name, d))
    return found


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return f"{sha}-dirty" if dirty else sha


def missing_outputs(root: Path) -> list[str]:
    missing = [p for p in ("dvc.lock", BACKBONE, BASE, METRICS) if not (root / p).exists()]
    if not missing and not find_adapters(root):
        missing.append("an adapter under " + " or ".join(f"{r}/<condition>/" for r in ADAPTER_ROOTS))
    return missing


def register_all(root: Path, *, dry_run: bool = False, log=print) -> tuple[list, list[str]] | None:
    """Register every adapter found under ``root``; returns (results, errors), or None when the
    graph's outputs are not there yet (nothing touched)."""
    root = Path(root).resolve()
    missing = missing_outputs(root)
    if missing:
        log(f"register: nothing to register yet -- missing {', '.join(missing)} in {root} "
            "(the DVC graph has not produced them in this checkout); registry untouched")
        return None
    from pipelines import registry  # MLflow only when there is something to register
    cfg = register_params(root)
    metrics_all = json.loads((root / METRICS).read_text())
    commit = git_commit(root)
    results, errors = [], []
    for cand in find_adapters(root):
        c = cand.condition
        try:
            dataset_hash = registry.dataset_hash_from_lock(root, c)
            cfg_file = cand.adapter_dir / "adapter_config.json"
            adapter_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            base_hash = adapter_cfg.get("base_hash") or registry.lock_hash(root, BASE)
            metrics = metrics_all.get(c) if isinstance(metrics_all.get(c), dict) else {}
            if dry_run:
                log(f"register: would register {c} from {cand.adapter_dir.relative_to(root)} "
                    f"(dataset {dataset_hash}, metrics {metrics})")
                continue
            res = registry.register_adapter(
                c, cand.adapter_dir, dataset_hash=dataset_hash, base_hash=base_hash,
                backbone_dir=root / BACKBONE, base_dir=root / BASE, metrics=metrics,
                git_commit=commit, gate=cfg["gate"],
                dataset_path=root / registry.PREPARED_CONDITIONS / c)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            errors.append(f"{c}: {exc}")
            log(f"register: {c}: NOT registered: {exc}")
            continue
        results.append(res)
        what = "registered" if res.created else "already registered"
        log(f"register: {res.model_name} v{res.version} {what}; {res.decision}: {res.reason}; "
            f"champion v{res.champion}")
    return results, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.register",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="project root (default: .)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be registered")
    args = parser.parse_args(argv)
    out = register_all(args.repo, dry_run=args.dry_run)
    if out is None:
        return 0
    results, errors = out
    if errors:
        print(f"register: {len(errors)} adapter(s) failed: " + "; ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
