"""DVC stage ``evaluate`` of the data-efficiency graph (params: ``efficiency``, ``evaluate.max_scans``,
``evaluate.sampling``, ``evaluate.gate_guidance``): every run of the curve (condition x K x method
x seed, at its selected rate) and the uncontrolled backbone, on the **test** scans of the
production evaluation (the first ``evaluate.max_scans`` in scan-id order, per-scan sampling seeds,
the gate guidance, the re-detectors of ``paths.detectors``) -> ``<paths.efficiency>/test_scores.json``.
This is the only stage of the graph that reads the test split; ``report`` turns the scores into
intervals.

``test_scores.json``: ``uncontrolled[condition]`` = per-scan fidelity ``[scans]``;
``runs[condition][K][method]`` = ``{learning_rate, tuned_at_k, at_edge, seeds, scores [seeds,
scans], trainable_params, total_params}``.
"""
from __future__ import annotations

import sys
from typing import Any

from pipelines.efficiency import common as C
from pipelines.stages.common import timed_stage

UNCONTROLLED = "uncontrolled"


def test_job(job) -> dict[str, Any]:
    """``("uncontrolled", condition)`` or a :class:`~pipelines.efficiency.common.Run`: per-scan test
    fidelity of its condition."""
    from ctrlora.evaluation.generation import SamplingConfig
    from ctrlora.evaluation.research import run_scores
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.baselines import load_run, read_run

    p, bb, det = C.ctx("p"), C.ctx("backbone"), C.ctx("detectors")
    sampling = SamplingConfig(**p["sampling"])
    if isinstance(job, tuple):
        c = job[1]
        data = C.ctx("test")[c]
        any_controlnet = CtrLoRAControlNet.from_pretrained(C.path(p, "base")).eval()  # never called without control
        _, scores = run_scores(bb, any_controlnet, None, c, data, det, sampling)
        C.log(f"[efficiency evaluate] {c} uncontrolled: {scores.mean():.4f}")
        return {"condition": c, "scores": scores.tolist(), "scan_ids": data.scan_ids}
    run = C.run_dir(p, job)
    info = read_run(run)
    if info["condition"] != job.condition or info["max_pairs"] != job.k or info["method"] != job.method:
        raise RuntimeError(f"{run}: holds {info['method']} on {info['condition']} from {info['max_pairs']} pairs, "
                           f"not the run {job.key}; rerun `train`")
    data = C.ctx("test")[job.condition]
    _, scores = run_scores(bb, *load_run(run, C.path(p, "base")), job.condition, data, det, sampling)
    C.log(f"[efficiency evaluate] {job.key}: {scores.mean():.4f}")
    return {"run": job, "info": info, "scores": scores.tolist(), "scan_ids": data.scan_ids}


def collect(p: dict[str, Any], rows: list[dict[str, Any]], rates: dict[str, Any]) -> dict[str, Any]:
    """The ``test_scores.json`` record from the jobs' results (seeds in order)."""
    unc = {r["condition"]: r for r in rows if "run" not in r}
    out: dict[str, Any] = {"split": "test", "sampling": p["sampling"], "k": p["k"], "methods": p["methods"],
                           "n_scans": {c: len(unc[c]["scan_ids"]) for c in p["conditions"]},
                           "scan_ids": {c: unc[c]["scan_ids"] for c in p["conditions"]},
                           "uncontrolled": {c: unc[c]["scores"] for c in p["conditions"]}, "runs": {}}
    for c in p["conditions"]:
        out["runs"][c] = {}
        for k in p["k"]:
            out["runs"][c][str(k)] = {}
            for m in p["methods"]:
                mine = sorted((r for r in rows if "run" in r and (r["run"].condition, r["run"].k, r["run"].method)
                               == (c, k, m)), key=lambda r: r["run"].seed)
                if any(r["scan_ids"] != unc[c]["scan_ids"] for r in mine):
                    raise RuntimeError(f"{c} K={k} {m}: scored on other test scans than the uncontrolled backbone")
                info = mine[0]["info"]
                out["runs"][c][str(k)][m] = {**rates[c][str(k)][m], "seeds": [r["run"].seed for r in mine],
                                             "train_seeds": [r["info"]["train_seed"] for r in mine],
                                             "trainable_params": info["trainable_params"],
                                             "total_params": info["total_params"],
                                             "scores": [r["scores"] for r in mine]}
    return out


def main() -> int:
    from pipelines.efficiency import evaluate as me  # picklable by module name in the workers

    p = C.params()
    with timed_stage("efficiency_evaluate"):
        rates = C.selected_rates(p)
        jobs: list[Any] = C.all_runs(p, rates) + [(UNCONTROLLED, c) for c in p["conditions"]]
        C.log(f"[efficiency evaluate] {len(jobs)} models on up to {p['test_scans']} test scans, {p['workers']} workers")
        rows = C.pool_map(me.test_job, jobs, ("backbone", "test", "detectors"), p["workers"], p["threads"])
        C.write_json(C.path(p, "efficiency") / "test_scores.json", collect(p, rows, rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
