"""DVC stages ``sweep`` and ``train`` of the data-efficiency graph (params: ``efficiency``, the
``train_adapter`` recipe, ``evaluate.sampling``; library: :func:`ctrlora.training.baselines.train_run`).

``sweep``  seed 0 of every method at each of its ``efficiency.learning_rates``, for every
           condition and every K of ``efficiency.tune_k``; each run is then scored on the first
           ``efficiency.validation_scans`` **validation** scans of its condition ->
           ``<paths.efficiency>/sweep/<condition>/k<K>/<method>/lr_<rate>/seed_0`` and
           ``<paths.efficiency>/sweep/validation.json`` (per-scan validation fidelity; ``select`` reads it).
``train``  every other run of the curve (every condition, K of ``efficiency.k``, method and seed
           < ``efficiency.seeds``) at the rate ``select`` chose for that K ->
           ``<paths.efficiency>/runs/...`` and ``runs/runs.json``. Seed 0 at a tuned K is the
           sweep's run at the chosen rate and is not trained again.

Runs go through a pool of ``efficiency.workers`` processes with ``efficiency.threads`` torch
threads each.
"""
from __future__ import annotations

import sys
from typing import Any

from pipelines.efficiency import common as C
from pipelines.stages.common import timed_stage, write_curve


def _train(run: C.Run) -> dict[str, Any]:
    from ctrlora.training.baselines import train_run

    p = C.ctx("p")
    out = C.run_dir(p, run)
    info = train_run(run.spec, C.ctx("backbone"), C.ctx("cache"), run.condition, C.recipe(p, run.k), out,
                     base_dir=C.path(p, "base"))
    write_curve(info.pop("history"), out / "loss.csv", ["loss"])
    return {**info, "k": run.k, "key": run.key}


def sweep_job(run: C.Run) -> dict[str, Any]:
    """Train one sweep run and score it on its condition's validation scans."""
    from ctrlora.evaluation.generation import SamplingConfig
    from ctrlora.evaluation.research import run_scores
    from ctrlora.training.baselines import load_run

    info = _train(run)
    p = C.ctx("p")
    controlnet, adapter = load_run(C.run_dir(p, run), C.path(p, "base"))
    data = C.ctx("validation")[run.condition]
    _, scores = run_scores(C.ctx("backbone"), controlnet, adapter, run.condition, data, C.ctx("detectors"),
                           SamplingConfig(**p["sampling"]))
    C.log(f"[efficiency sweep] {run.key}: validation fidelity {scores.mean():.4f}")
    return {**info, "scan_ids": data.scan_ids, "scores": scores.tolist(), "mean": float(scores.mean())}


def train_job(run: C.Run) -> dict[str, Any]:
    info = _train(run)
    C.log(f"[efficiency train] {run.key}: trained")
    return info


def _by_cost(runs: list[C.Run]) -> list[C.Run]:
    """Full fine-tunes first (their steps cost the most), so the two workers end level."""
    from ctrlora.training.baselines import method

    return sorted(runs, key=lambda r: method(r.method).mode != "full")


def sweep(p: dict[str, Any]) -> None:
    from pipelines.efficiency import train as me  # picklable by module name in the workers

    C.check_pairs(p, p["tune_k"])
    runs = [C.Run(c, k, m, float(r), 0) for c in p["conditions"] for k in p["tune_k"] for m in p["methods"]
            for r in p["learning_rates"][m]]
    C.log(f"[efficiency sweep] {len(runs)} runs on {p['workers']} workers")
    rows = C.pool_map(me.sweep_job, _by_cost(runs), ("backbone", "cache", "validation", "detectors"),
                      p["workers"], p["threads"])
    scan_ids: dict[str, list[str]] = {}
    for r in rows:
        ids = r.pop("scan_ids")
        if scan_ids.setdefault(r["condition"], ids) != ids:
            raise RuntimeError(f"sweep runs of {r['condition']} were scored on different validation scans")
    C.write_json(C.path(p, "efficiency") / "sweep" / "validation.json",
                 {"split": "validation", "n_scans": {c: len(v) for c, v in scan_ids.items()}, "scan_ids": scan_ids,
                  "runs": sorted(rows, key=lambda r: r["key"])})


def train(p: dict[str, Any]) -> None:
    from pipelines.efficiency import train as me

    C.check_pairs(p, p["k"])
    runs = [r for r in C.all_runs(p, C.selected_rates(p)) if not C.in_sweep(p, r)]
    out = C.path(p, "efficiency") / "runs"
    out.mkdir(parents=True, exist_ok=True)
    C.log(f"[efficiency train] {len(runs)} runs on {p['workers']} workers")
    rows = C.pool_map(me.train_job, _by_cost(runs), ("backbone", "cache"), p["workers"], p["threads"]) if runs else []
    C.write_json(out / "runs.json", {"runs": sorted(rows, key=lambda r: r["key"])})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("sweep", "train"):
        raise SystemExit("usage: python -m pipelines.efficiency.train <sweep|train>")
    p = C.params()
    with timed_stage(f"efficiency_{argv[0]}"):
        (sweep if argv[0] == "sweep" else train)(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
