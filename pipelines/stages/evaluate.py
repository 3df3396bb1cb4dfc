"""DVC stage ``evaluate`` (params: ``evaluate`` + the condition lists of ``train_base`` and
``train_adapter``): on the test split, every condition's adapter against no control and the
combination against each single condition, with paired bootstrap intervals, at each guidance
scale of ``evaluate.guidance`` (the bar is read at ``evaluate.gate_guidance``) ->
``paths.metrics.evaluate``; grids and per-scan scores -> ``paths.reports.evaluate``. The
re-detectors are read from ``paths.detectors``: the foundation graph trains them once on the
rendered training split and ships them, so a retrain never changes the yardstick. Library:
:mod:`ctrlora.evaluation.run`."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.settings import BASE_ADAPTERS
from pipelines.stages.common import TIMINGS_FILE, artefact_paths, read_params, resolve_backbone, timed_stage

TIMING_LOG = TIMINGS_FILE.parent / "evaluate_seconds.json"  # the last run's time per part (logs/, untracked)
# the keys of params evaluate this entry reads itself, beside those EvalConfig.from_params reads
OWN_KEYS = ("max_scans", "workers", "threads", "progress")


def eval_config(p: dict[str, Any], base_conditions: list[str], new_conditions: list[str]):
    """The run's :class:`~ctrlora.evaluation.run.EvalConfig` from the ``evaluate`` params (every
    key stated there: a missing or unknown one is an error, never a silent library default)."""
    from ctrlora.evaluation import run as evaluation

    try:
        return evaluation.EvalConfig.from_params(p, base_conditions, new_conditions, also=OWN_KEYS)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"params.yaml evaluate: {e}") from e


# ---------------------------------------------------------------------------- generation over processes
# Each worker loads the models and the test scans once (spawned processes share nothing), then
# generates whole jobs: one pass of one model at one guidance scale. Two one-thread processes get
# more done on two cores than one two-thread process; images do not depend on which process made
# them, only on the thread count (float order), which params fixes.
_WORKER: dict[str, Any] = {}


def _worker_init(needs: tuple[str, ...], threads: int) -> None:
    from ctrlora.evaluation import run as evaluation
    from ctrlora.sampling import CtrLoRAPipeline

    torch.set_num_threads(int(threads))
    spec = json.loads(needs[0])
    models = evaluation.load_models(Path(spec["backbone"]), Path(spec["base"]),
                                    {c: Path(a) for c, a in spec["adapters"].items()})
    test = evaluation.load_test_split(Path(spec["prepared"]), "test", spec["conditions"],
                                      [Path(x) for x in spec["sources"]], spec["max_scans"], False)
    pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet)
    pipe.set_progress_bar_config(disable=True)
    _WORKER.update(pipe=pipe, test=test, sampling=evaluation.SamplingConfig(**spec["sampling"]))


def _worker_job(job):
    from ctrlora.evaluation import run as evaluation

    return evaluation.run_job(_WORKER["pipe"], _WORKER["test"], job, _WORKER["sampling"])


def process_runner(spec: dict[str, Any], workers: int, threads: int):
    """A job runner over ``workers`` spawned processes of ``threads`` torch threads each."""
    from pipelines.workers import pool_map

    def run(jobs):
        # the largest jobs first, so the last ones to finish are short
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i].n_scans * (2 if jobs[i].guidance > 1 else 1))
        done = pool_map(_worker_job, [jobs[i] for i in order], [json.dumps(spec)], workers, threads, _worker_init)
        out: list[Any] = [None] * len(jobs)
        for i, im in zip(order, done):
            out[i] = im
        return out

    return run


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
    workers, threads, progress = int(p["workers"]), int(p["threads"]), bool(p["progress"])
    if workers > 1 and torch.cuda.is_available():
        workers = 1  # one GPU: one generating process
    torch.set_num_threads(workers * threads)  # this process: loading and scoring
    with timed_stage("evaluate"):
        t = time.perf_counter()
        adapters = {c: paths["base"] / BASE_ADAPTERS / c for c in base_conditions}
        adapters.update({c: paths["adapters"] / c for c in new_conditions})
        backbone = resolve_backbone(paths["backbone"])
        models = evaluation.load_models(backbone, paths["base"], adapters)
        sources = [paths["rendered"], paths["scans"]]  # the scans prepare read: their raw label maps
        # each condition on the test scans that have it (a clinic scan may have only some maps)
        test = evaluation.load_test_split(paths["prepared"], "test", cfg.conditions, sources, p["max_scans"],
                                          progress)
        # images are drawn at the scans' size (evaluation.generate passes it, also to the pass
        # without control); the UNet takes only multiples of the VAE factor × 2^downsamples, so
        # refuse another size here rather than after loading the detectors
        mult = int(models.backbone.vae_scale_factor) * 2 ** (len(models.backbone.unet.config.down_block_types) - 1)
        h, w = (int(v) for v in test.data.photos.shape[1:3])
        if h % mult or w % mult:
            raise SystemExit(f"[evaluate] the prepared scans are {h}x{w} px, and this backbone's UNet draws only "
                             f"sizes that are multiples of {mult} px: set params.yaml prepare.resolution to a "
                             f"multiple of {mult}")
        runner = None
        if workers > 1:
            spec = {"backbone": str(backbone), "base": str(paths["base"]),
                    "adapters": {c: str(a) for c, a in adapters.items()}, "prepared": str(paths["prepared"]),
                    "conditions": cfg.conditions, "sources": [str(x) for x in sources], "max_scans": p["max_scans"],
                    "sampling": dataclasses.asdict(cfg.sampling)}
            runner = process_runner(spec, workers, threads)
            print(f"[evaluate] generating over {workers} processes of {threads} thread(s)", flush=True)
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
                                            progress=progress, runner=runner)
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
