"""DVC stage ``evaluate`` (params: ``evaluate`` + the condition lists of ``train_base`` and
``train_adapter``): on the test split, every condition's adapter against no control and the
combination against each single condition, with paired bootstrap intervals, at each guidance
scale of ``evaluate.guidance`` (the bar is read at ``evaluate.gate_guidance``) ->
``paths.metrics.evaluate``; grids and per-scan scores -> ``paths.reports.evaluate``. The
re-detectors are read from ``paths.detectors``: the foundation graph trains them once on the
rendered training split and ships them, so a retrain never changes the yardstick. Library:
:mod:`ctrlora.evaluation.run`."""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.settings import BASE_ADAPTERS
from pipelines.stages.common import TIMINGS_FILE, artefact_paths, read_params, resolve_backbone, timed_stage

TIMING_LOG = TIMINGS_FILE.parent / "evaluate_seconds.json"  # the last run's time per part (logs/, untracked)


def eval_config(p: dict[str, Any], base_conditions: list[str], new_conditions: list[str]):
    """The run's :class:`~ctrlora.evaluation.run.EvalConfig` from the ``evaluate`` params."""
    from ctrlora.evaluation import run as evaluation

    sampling = {k: v for k, v in p["sampling"].items() if k != "guidance_scale"}
    boot = p.get("bootstrap") or {}
    try:
        return evaluation.EvalConfig(
            base_conditions, new_conditions, combined={str(k): float(v) for k, v in (p.get("combined") or {}).items()},
            condition_weights={str(k): float(v) for k, v in (p.get("condition_weights") or {}).items()},
            sampling=evaluation.SamplingConfig(**sampling), guidance=list(p.get("guidance", [1.0])),
            gate_guidance=float(p.get("gate_guidance", 1.0)),
            other_guidance_max_scans=p.get("other_guidance_max_scans"),
            n_boot=int(boot.get("n_boot", 2000)), bootstrap_seed=int(boot.get("seed", 0)),
            grid_rows=int(p.get("grid_rows", 8)))
    except ValueError as e:
        raise SystemExit(f"params.yaml evaluate: {e}") from e


def print_bar(bar: dict[str, Any]) -> None:
    for name, c in bar["checks"].items():
        span = "" if c["low"] is None or c["low"] == c["high"] else f" [{c['low']}, {c['high']}]"
        print(f"[evaluate] quality bar {name}: {c['value']}{span} vs {c['threshold']} -> "
              f"{'PASS' if c['pass'] else 'FAIL'}")
    print(f"[evaluate] quality bar at guidance {bar['guidance']:g}: {bar['passed']}/{bar['total']} checks pass")


def main() -> int:
    from ctrlora.evaluation import run as evaluation

    allp, paths = read_params("evaluate", "train_base", "train_adapter"), artefact_paths()
    p = allp["evaluate"]
    base_conditions = list(allp["train_base"]["conditions"])
    new_conditions = list(allp["train_adapter"]["conditions"])
    cfg = eval_config(p, base_conditions, new_conditions)
    if p.get("threads"):
        torch.set_num_threads(int(p["threads"]))
    progress = bool(p.get("progress", True))
    with timed_stage("evaluate"):
        t = time.perf_counter()
        adapters = {c: paths["base"] / BASE_ADAPTERS / c for c in base_conditions}
        adapters.update({c: paths["adapters"] / c for c in new_conditions})
        models = evaluation.load_models(resolve_backbone(paths["backbone"]), paths["base"], adapters)
        sources = [paths["rendered"], paths["scans"]]  # the scans prepare read: their raw label maps
        test = evaluation.load_split(paths["prepared"], "test", cfg.conditions, sources, p.get("max_scans"),
                                     progress)
        t_load = time.perf_counter() - t
        print(f"[evaluate] {len(test)} test scans ({t_load:.1f} s)", flush=True)
        t = time.perf_counter()
        try:
            detectors = evaluation.load_detectors(cfg.conditions, paths["detectors"])
        except FileNotFoundError as e:
            raise SystemExit(f"[evaluate] {e}: the re-detectors ship with the foundation; add the condition to "
                             "params.yaml detectors.conditions and run `make foundation`") from e
        t_det = time.perf_counter() - t
        print(f"[evaluate] detectors ready ({t_det:.1f} s)", flush=True)
        metrics = evaluation.run_evaluation(models, test, detectors, cfg, paths["reports"]["evaluate"],
                                            progress=progress)
        # wall times go to the (untracked) log, not the metrics: the metrics file holds only what the
        # models and data determine, so an identical rerun writes it byte for byte (and DVC agrees)
        timing = {"load": round(t_load, 1), "detectors": round(t_det, 1), **metrics.pop("timing_seconds")}
        print(f"[evaluate] seconds: {json.dumps(timing)}", flush=True)
        TIMING_LOG.parent.mkdir(parents=True, exist_ok=True)
        TIMING_LOG.write_text(json.dumps(timing, indent=1) + "\n")
        out = paths["metrics"]["evaluate"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(evaluation.json_ready(metrics), indent=1) + "\n")
        print_bar(metrics["quality_bar"])
        print(f"[evaluate] -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
