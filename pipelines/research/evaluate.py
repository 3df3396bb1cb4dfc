"""DVC stage ``evaluate`` of the research graph (params: ``research``, ``evaluate.max_scans``,
``evaluate.sampling``): every method, every seed, at its selected rate, on the **test** scans of
the production evaluation (same scans, per-scan sampling seeds and re-detectors), plus the
uncontrolled backbone -> ``<paths.research>/test_scores.json`` (per-scan fidelity ``[seeds, scans]`` per
method; for the snapshot methods (``adapter``, ``adapter_unet_copy``, ``cnn``, ``vae_scratch``) also per
snapshot step on the first
``research.ablation_scans`` scans) and ``<paths.reports.research>/samples.png`` (condition, uncontrolled, each
method's seed-0 image, photograph). ``report`` turns the scores into intervals.
"""
from __future__ import annotations

import sys
from typing import Any

from pipelines.research import common as C
from pipelines.stages.common import timed_stage

UNCONTROLLED = "uncontrolled"
GRID_ROWS = 8


def test_job(job: tuple) -> dict[str, Any]:
    """``("uncontrolled",)`` or ``(method, rate, seed)``: per-scan test fidelity (+ snapshots)."""
    from ctrlora.evaluation.generation import SamplingConfig
    from ctrlora.evaluation.research import run_scores
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.baselines import RunSpec, load_run, read_run, run_snapshots

    p, bb, data, det = C.ctx("p"), C.ctx("backbone"), C.ctx("test"), C.ctx("detectors")
    sampling, c = SamplingConfig(**p["sampling"]), p["condition"]
    if job[0] == UNCONTROLLED:
        any_controlnet = CtrLoRAControlNet.from_pretrained(C.path(p, "base")).eval()
        images, scores = run_scores(bb, any_controlnet, None, c, data, det, sampling)
        C.log(f"[research evaluate] uncontrolled: {scores.mean():.4f}")
        return {"job": job, "scores": scores.tolist(), "images": images[:GRID_ROWS], "scan_ids": data.scan_ids}
    run = C.run_dir(p, RunSpec(*job))
    controlnet, adapter = load_run(run, C.path(p, "base"))
    images, scores = run_scores(bb, controlnet, adapter, c, data, det, sampling)
    out = {"job": job, "info": read_run(run), "scores": scores.tolist(), "images": images[:GRID_ROWS], "snapshots": {}}
    sub = data.subset(int(p["ablation_scans"]))
    for step in sorted(run_snapshots(run)):
        _, s = run_scores(bb, *load_run(run, C.path(p, "base"), step=step), c, sub, det, sampling)
        out["snapshots"][step] = s.tolist()
    C.log(f"[research evaluate] {job[0]} seed {job[2]} (lr {job[1]:g}): {scores.mean():.4f}")
    return out


def collect(p: dict[str, Any], rows: list[dict[str, Any]], rates: dict[str, float]) -> dict[str, Any]:
    """The ``test_scores.json`` record from the jobs' results (seeds in order)."""
    unc = next(r for r in rows if r["job"][0] == UNCONTROLLED)
    methods: dict[str, Any] = {}
    for m in p["methods"]:
        runs = sorted((r for r in rows if r["job"][0] == m), key=lambda r: r["job"][2])
        info = runs[0]["info"]
        entry = {"learning_rate": rates[m], "seeds": [r["job"][2] for r in runs],
                 "trainable_params": info["trainable_params"], "total_params": info["total_params"],
                 "scores": [r["scores"] for r in runs]}
        if runs[0]["snapshots"]:
            steps = sorted(runs[0]["snapshots"])
            entry["snapshots"] = {s: [r["snapshots"][s] for r in runs] for s in steps}
        methods[m] = entry
    return {"split": "test", "condition": p["condition"], "sampling": p["sampling"], "n_scans": len(unc["scan_ids"]),
            "scan_ids": unc["scan_ids"], "ablation_scans": min(int(p["ablation_scans"]), len(unc["scan_ids"])),
            "uncontrolled": unc["scores"], "methods": methods}


def save_samples(p: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from ctrlora.evaluation.grids import save_grid
    from ctrlora.evaluation.loading import condition_cell, load_split

    c = p["condition"]
    data = load_split(C.path(p, "prepared"), "test", [c], max_scans=GRID_ROWS, progress=False)
    cols = [next(r for r in rows if r["job"][0] == UNCONTROLLED)["images"]]
    cols += [next(r for r in rows if r["job"][0] == m and r["job"][2] == 0)["images"] for m in p["methods"]]
    n = min(len(data), *(len(col) for col in cols))
    grid = [[condition_cell(c, data, i), *(col[i] for col in cols), data.photos[i]] for i in range(n)]
    save_grid(grid, C.path(p, "reports", "research") / "samples.png",
              titles=[c, UNCONTROLLED, *p["methods"], "ground truth"])


def main() -> int:
    from ctrlora.training.baselines import method
    from pipelines.research import evaluate as me  # picklable by module name in the workers
    from pipelines.research.train import selected_rates

    p = C.params()
    with timed_stage("research_evaluate"):
        rates = selected_rates(p)
        runs = [(m, rates[m], k) for m in p["methods"] for k in range(int(p["seeds"]))]
        # the snapshot methods generate ~3x more images: start them first so the pool ends level
        jobs = sorted(runs, key=lambda j: not method(j[0]).snapshots) + [(UNCONTROLLED,)]
        C.log(f"[research evaluate] {len(jobs)} models on up to {p['test_scans']} test scans, {p['workers']} workers")
        rows = C.pool_map(me.test_job, jobs, ("backbone", "test", "detectors"), p["workers"], p["threads"])
        C.write_json(C.path(p, "research") / "test_scores.json", collect(p, rows, rates))
        save_samples(p, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
