"""Register every trained adapter in MLflow and apply the promotion gate (after ``dvc repro``).

Runs outside every cached DVC stage -- DVC may restore a cached stage without running it, and
registration must still see its outputs. Idempotent: an adapter already registered with the same
adapter hash and dataset hash is reported, not registered again.

    .venv/bin/python -m pipelines.registry.register [--repo DIR] [--dry-run]

Looks for adapters in ``models/adapters/<c>/`` (new conditions) and ``models/base/adapters/<c>/``
(base conditions), reads each one's dataset hash from ``dvc.lock``, the metrics from
``metrics/evaluate.json`` and the gate from ``params.yaml`` section ``register``. A model's first
version takes the ``champion`` alias; every later one is scored against the champion on the frozen
benchmark (:mod:`pipelines.registry.frozen_benchmark`) and takes it only when the paired interval says so. Before
the graph has produced those outputs it says which are missing and exits 0 without opening the
registry.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ctrlora.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pipelines.registry.dvclock import LOCK_FILE, dataset_hash_from_lock, lock_hash
from pipelines.registry.gate import gate_config
from pipelines.settings import (ADAPTER_ROOTS, BACKBONE_DIR, BASE_DIR, METRICS_FILE,
                                PREPARED_CONDITIONS, REPO_ROOT, load_params)
from pipelines.stages.common import backbone_part


@dataclass
class Candidate:
    condition: str
    adapter_dir: Path


def register_params(root: Path) -> dict[str, Any]:
    """params.yaml section ``register`` with the gate completed from the defaults (the section
    may be absent)."""
    section = load_params(root).get("register") or {}
    return {**section, "gate": gate_config(section.get("gate"))}


def required(section: Mapping[str, Any], key: str, where: str) -> Any:
    """``section[a][b]...`` for ``key = "a.b..."``; a missing key is an error naming it
    (``where``: the file and section it should be in)."""
    node: Any = section
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{where}.{key} is missing")
        node = node[part]
    return node


def evaluate_params(root: Path) -> dict[str, Any]:
    """params.yaml section ``evaluate`` of the project at ``root`` (``{}`` when absent)."""
    return dict(load_params(root).get("evaluate") or {})


def sampling_recipe(evaluate: Mapping[str, Any], condition: str,
                    where: str = "params.yaml evaluate") -> dict[str, Any] | None:
    """How ``condition``'s version was evaluated (params ``evaluate``, read once by the caller:
    the sampler, its steps, the gating guidance and the condition's residual weight, 1 where
    ``condition_weights`` names no weight, as in the evaluation); what serving samples with
    unless told otherwise. None when the params have no evaluation sampling."""
    if "sampling" not in evaluate:
        return None
    return {"scheduler": str(required(evaluate, "sampling.scheduler", where)),
            "steps": int(required(evaluate, "sampling.steps", where)),
            "guidance_scale": float(required(evaluate, "gate_guidance", where)),
            "weight": float((evaluate.get("condition_weights") or {}).get(condition, 1.0))}


def find_adapters(root: Path) -> list[Candidate]:
    found = []
    for rel in ADAPTER_ROOTS:
        base = root / rel
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            if (d / ADAPTER_WEIGHTS).is_file():
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
    missing = [p for p in (LOCK_FILE, BACKBONE_DIR, BASE_DIR, METRICS_FILE)
               if not (root / p).exists()]
    if not missing and not find_adapters(root):
        missing.append("an adapter under " + " or ".join(f"{r}/<condition>/" for r in ADAPTER_ROOTS))
    return missing


def _register_one(root: Path, cand: Candidate, metrics_all: dict, commit: str,
                  gate: dict[str, Any], dry_run: bool, log, judge=None,
                  recipe: dict[str, Any] | None = None):
    """Register one adapter (or say what would be registered); None on a dry run."""
    from pipelines.registry.registration import register_adapter  # MLflow only when registering

    c = cand.condition
    dataset_hash = dataset_hash_from_lock(root, c)
    cfg_file = cand.adapter_dir / ADAPTER_CONFIG
    adapter_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    base_hash = adapter_cfg.get("base_hash") or lock_hash(root, BASE_DIR)
    metrics = metrics_all.get(c) if isinstance(metrics_all.get(c), dict) else {}
    if dry_run:
        log(f"register: would register {c} from {cand.adapter_dir.relative_to(root)} "
            f"(dataset {dataset_hash}, metrics {metrics})")
        return None
    return register_adapter(
        c, cand.adapter_dir, dataset_hash=dataset_hash, base_hash=base_hash,
        backbone_dir=backbone_part(root / BACKBONE_DIR, root), base_dir=root / BASE_DIR, metrics=metrics,
        git_commit=commit, gate=gate, dataset_path=root / PREPARED_CONDITIONS / c, judge=judge,
        recipe=recipe)


def register_all(root: Path, *, dry_run: bool = False, log=print) -> tuple[list, list[str]] | None:
    """Register every adapter found under ``root``; returns (results, errors), or None when the
    graph's outputs are not there yet (nothing touched)."""
    root = Path(root).resolve()
    missing = missing_outputs(root)
    if missing:
        log(f"register: nothing to register yet -- missing {', '.join(missing)} in {root} "
            "(the DVC graph has not produced them yet); registry untouched")
        return None
    gate = register_params(root)["gate"]
    evaluate = evaluate_params(root)
    where = f"{root / 'params.yaml'}: evaluate"
    recipes = {c.condition: sampling_recipe(evaluate, c.condition, where) for c in find_adapters(root)}
    metrics_all = json.loads((root / METRICS_FILE).read_text())
    commit = git_commit(root)
    judge = None
    if not dry_run:
        from pipelines.registry.frozen_benchmark import gate_for

        judge = gate_for(root, gate, log)
    results, errors = [], []
    try:
        for cand in find_adapters(root):
            try:
                res = _register_one(root, cand, metrics_all, commit, gate, dry_run, log, judge,
                                    recipes[cand.condition])
            except (KeyError, FileNotFoundError, ValueError) as exc:
                errors.append(f"{cand.condition}: {exc}")
                log(f"register: {cand.condition}: NOT registered: {exc}")
                continue
            if res is None:
                continue
            results.append(res)
            what = "registered" if res.created else "already registered"
            log(f"register: {res.model_name} v{res.version} {what}; {res.decision}: {res.reason}; "
                f"champion v{res.champion}")
    finally:
        if judge is not None:
            judge.close()
    return results, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.registry.register",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT,
                        help=f"project root (default: {REPO_ROOT})")
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
