"""DVC stages ``sweep`` and ``seeds`` of the research graph (params: ``research``, the
``train_adapter`` recipe, ``evaluate.sampling``; library: :mod:`ctrlora.training.baselines`).

``sweep``  every method of ``research.methods`` at each of its ``research.learning_rates``, seed
           0, each run then scored on the first ``research.validation_scans`` **validation**
           scans -> ``<paths.research>/sweep/<method>/lr_<rate>/seed_0`` and
           ``<paths.research>/sweep/validation.json`` (the per-scan validation fidelity of every
           run; ``select`` reads it).
``seeds``  seeds 1 .. ``research.seeds`` - 1 of every method at the rate ``select`` chose
           (``paths.metrics.research_selection``) ->
           ``<paths.research>/seeds/<method>/lr_<rate>/seed_<k>``. Seed 0 at that rate is the
           sweep's run and is not trained again.

Runs go through a pool of ``research.workers`` processes with ``research.threads`` torch
threads each.
"""
from __future__ import annotations

import sys
from typing import Any

from pipelines.research import common as C
from pipelines.stages.common import timed_stage, write_curve


def _train(spec) -> dict[str, Any]:
    from ctrlora.training.baselines import Recipe, train_run

    p = C.ctx("p")
    out = C.run_dir(p, spec)
    info = train_run(spec, C.ctx("backbone"), C.ctx("cache"), p["condition"], Recipe.from_params(p["recipe"]), out,
                     base_dir=C.path(p, "base"), condition_images=C._CTX.get("images"),
                     snapshot_every=p["snapshot_every"])
    write_curve(info.pop("history"), out / "loss.csv", ["loss"])
    return info


def sweep_job(spec) -> dict[str, Any]:
    """Train one sweep run and score it on the validation scans."""
    from ctrlora.evaluation.generation import SamplingConfig
    from ctrlora.evaluation.research import run_scores
    from ctrlora.training.baselines import load_run

    info = _train(spec)
    p = C.ctx("p")
    controlnet, adapter = load_run(C.run_dir(p, spec), C.path(p, "base"))
    data = C.ctx("validation")
    _, scores = run_scores(C.ctx("backbone"), controlnet, adapter, p["condition"], data, C.ctx("detectors"),
                           SamplingConfig(**p["sampling"]))
    C.log(f"[research sweep] {spec.key}: validation fidelity {scores.mean():.4f}")
    return {**info, "key": spec.key, "scan_ids": data.scan_ids, "scores": scores.tolist(),
            "mean": float(scores.mean())}


def seed_job(spec) -> dict[str, Any]:
    info = _train(spec)
    C.log(f"[research seeds] {spec.key}: trained")
    return {**info, "key": spec.key}


def selected_rates(p: dict[str, Any]) -> dict[str, float]:
    """``{method: learning rate}`` chosen by ``select`` on the validation scans."""
    sel = C.read_json(C.path(p, "metrics", "research_selection"))["methods"]
    missing = [m for m in p["methods"] if m not in sel]
    if missing:
        raise SystemExit(f"{C.path(p, 'metrics', 'research_selection')}: no selected rate for {missing}; "
                         "rerun `select`")
    return {m: float(sel[m]["learning_rate"]) for m in p["methods"]}


def sweep(p: dict[str, Any]) -> None:
    from ctrlora.training.baselines import sweep_specs
    from pipelines.research import train as me  # picklable by module name in the workers

    specs = sweep_specs(p["learning_rates"], p["methods"])
    C.log(f"[research sweep] {len(specs)} runs on {p['workers']} workers")
    rows = C.pool_map(me.sweep_job, specs, ("backbone", "cache", "validation", "detectors"),
                      p["workers"], p["threads"])
    scan_ids = rows[0]["scan_ids"]
    for r in rows:
        if r.pop("scan_ids") != scan_ids:
            raise RuntimeError("sweep runs were scored on different validation scans")
    C.write_json(C.path(p, "research") / "sweep" / "validation.json",
                 {"split": "validation", "condition": p["condition"], "n_scans": len(scan_ids),
                  "scan_ids": scan_ids, "runs": rows})


def seeds(p: dict[str, Any]) -> None:
    from ctrlora.training.baselines import RunSpec
    from pipelines.research import train as me

    rates = selected_rates(p)
    specs = [RunSpec(m, rates[m], k) for m in p["methods"] for k in range(1, int(p["seeds"]))]
    out = C.path(p, "research") / "seeds"
    out.mkdir(parents=True, exist_ok=True)
    C.log(f"[research seeds] {len(specs)} runs on {p['workers']} workers")
    rows = C.pool_map(me.seed_job, specs, ("backbone", "cache"), p["workers"], p["threads"]) if specs else []
    C.write_json(out / "seeds.json", {"runs": rows})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("sweep", "seeds"):
        raise SystemExit("usage: python -m pipelines.research.train <sweep|seeds>")
    p = C.params()
    with timed_stage(f"research_{argv[0]}"):
        (sweep if argv[0] == "sweep" else seeds)(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
