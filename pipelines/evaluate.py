"""DVC stage ``evaluate`` (params: ``evaluate`` + the condition lists of ``train_base``,
``train_adapter`` and ``baselines``): condition fidelity and image metrics on the held-out scans
for every condition, segmentation + lighting combined, and the baselines; the quality bar ->
``metrics/evaluate.json``; grids and plot data -> ``reports/evaluate/``; the re-detectors ->
``models/evaluate/detectors`` (trained once per run). Library: :mod:`ctrlora.evaluation.run`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stage import read_params, resolve_backbone, timed_stage

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from ctrlora.evaluation import run as R

    allp = read_params("evaluate", "train_base", "train_adapter", "baselines")
    p = allp["evaluate"]
    base_conditions = list(allp["train_base"]["conditions"])
    new_conditions = list(allp["train_adapter"]["conditions"])
    bc = allp["baselines"]["condition"]
    names = list(allp["baselines"]["names"])
    combined = {str(k): float(v) for k, v in (p.get("combined") or {}).items()}
    unknown = sorted(set(combined) - set(base_conditions) - set(new_conditions))
    if unknown:
        raise SystemExit(f"evaluate.combined names conditions without an adapter: {unknown}")
    if p.get("threads"):
        torch.set_num_threads(int(p["threads"]))
    progress = bool(p.get("progress", True))
    conditions = base_conditions + new_conditions
    with timed_stage("evaluate"):
        t = time.perf_counter()
        adapters = {c: ROOT / p["base"] / "adapters" / c for c in base_conditions}
        adapters.update({c: ROOT / p["adapters"] / c for c in new_conditions})
        models = R.load_models(resolve_backbone(ROOT / p["backbone"]), ROOT / p["base"], adapters,
                               baselines_dir=ROOT / p["baselines"], baseline_condition=bc, baseline_names=names)
        sources = [ROOT / s for s in p["scan_sources"]]
        test = R.load_split(ROOT / p["prepared"], "test", conditions, sources, p.get("max_scans"), progress)
        train = R.load_split(ROOT / p["prepared"], "train", conditions, sources, p.get("detector_max_scans"), progress)
        print(f"[evaluate] {len(test)} held-out scans, {len(train)} training scans for the detectors "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        t = time.perf_counter()
        detectors = R.get_detectors(conditions, train, ROOT / p["detectors_out"], p.get("detector"), progress)
        t_det = time.perf_counter() - t
        print(f"[evaluate] detectors ready ({t_det:.1f} s)", flush=True)
        cfg = R.EvalConfig(base_conditions, new_conditions, combined=combined, baseline_condition=bc,
                           sampling=R.SamplingConfig(**p["sampling"]), ablation_max_scans=p.get("ablation_max_scans"),
                           grid_rows=int(p.get("grid_rows", 8)))
        t = time.perf_counter()
        metrics = R.run_evaluation(models, test, detectors, cfg, ROOT / p["reports"], progress=progress)
        metrics["timing_seconds"] = {"detectors": round(t_det, 1), "generate_and_score": round(time.perf_counter() - t, 1)}
        out = ROOT / p["metrics"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(R.json_ready(metrics), indent=1) + "\n")
        qb = metrics["quality_bar"]
        for k, v in qb.items():
            print(f"[evaluate] quality bar {k}: {v['value']} vs {v['threshold']} -> {'PASS' if v['pass'] else 'FAIL'}")
        print(f"[evaluate] -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
