"""Measure how well the re-detectors read conditions from *real* held-out photographs.

A detector that cannot read a condition from a real photo cannot judge a generated one, so this
is the ceiling of every fidelity figure. Renders scans in memory with the data package's
renderer (train and test from different dataset seeds), trains one detector per rendered
condition with :func:`~ctrlora.evaluation.fidelity.default_detector_config`, and prints JSON:
held-out scores, a trivial baseline for each (all background / the training mean map) and the
training time.

    .venv/bin/python -m ctrlora.evaluation.detector_check --n-train 2000 --n-test 200
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CONDITIONS = ("segmentation", "lighting", "normal", "depth")


def _render(seed: int, n: int, workers: int) -> dict[str, np.ndarray]:
    keys = ("photo", "segmentation", "lighting", "normal", "depth")
    if workers > 1:
        from multiprocessing import Pool

        with Pool(workers) as pool:
            scans = pool.map(_render_one, [(seed, i) for i in range(n)], chunksize=32)
    else:
        scans = [_render_one((seed, i)) for i in range(n)]
    return {k: np.stack([s[j] for s in scans]) for j, k in enumerate(keys)}


def _render_one(job: tuple[int, int]) -> tuple[Any, ...]:
    # imported here: the evaluation library itself does not depend on the data package
    from ctrlora.data.render import render_scan, scan_seed

    seed, i = job
    s = render_scan(scan_seed(seed, i)).scan
    return s.photo, s.segmentation, s.lighting, s.normal, s.depth


def check(n_train: int, n_test: int, epochs: int | None, conditions=CONDITIONS, workers: int = 2,
          progress: bool = True) -> dict:
    import torch

    from . import metrics as M
    from .detectors import predict, train_detector
    from .fidelity import condition_fidelity, default_detector_config

    t0 = time.perf_counter()
    train = _render(0, n_train, workers)
    test = _render(1, n_test, workers)
    report: dict = {"n_train": n_train, "n_test": n_test, "torch_threads": torch.get_num_threads(),
                    "render_s": round(time.perf_counter() - t0, 1), "conditions": {}}
    for cond in conditions:
        cfg = default_detector_config(cond, **({"epochs": epochs} if epochs is not None else {}))
        target = train[cond].astype(np.int64) if cond == "segmentation" else train[cond].astype(np.float32) / 255.0
        t = time.perf_counter()
        model = train_detector(cfg, train["photo"], target, progress=progress)
        train_s = time.perf_counter() - t
        extra = {"normal_mask": test["segmentation"] > 0} if cond == "normal" else {}
        scores: dict[str, Any] = condition_fidelity(cond, test["photo"], test[cond], {cond: model}, **extra)
        if cond == "segmentation":
            base = {"miou": M.miou(np.zeros_like(test[cond], dtype=np.int64), test[cond].astype(np.int64), cfg.channels)}
            pred = predict(model, test["photo"])
            scores["miou_pooled"] = M.miou(pred, test[cond].astype(np.int64), cfg.channels)
            scores["per_class_iou"] = [None if np.isnan(v) else round(float(v), 4)
                                       for v in M.per_class_iou(pred, test[cond].astype(np.int64), cfg.channels)]
        else:
            mean_map = np.broadcast_to(target.mean(0), test[cond].shape).astype(np.float32)
            true = test[cond].astype(np.float32) / 255.0
            base = {"ssim": M.mean_ssim(mean_map, true, 1.0), "mae": M.mae(mean_map, true)}
        report["conditions"][cond] = {
            "epochs": cfg.epochs,
            "train_s": round(train_s, 1),
            "held_out": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()},
            "trivial_baseline": {k: round(v, 4) for k, v in base.items()},
        }
        log.info(json.dumps({cond: report["conditions"][cond]}))  # progress: one condition's result
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=None, help="override every detector's epochs")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--workers", type=int, default=2, help="render processes")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    # the per-condition progress lines go to stderr, the report alone to stdout (unless the host
    # program configured logging itself)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("ctrlora").setLevel(logging.INFO)
    print(json.dumps(check(a.n_train, a.n_test, a.epochs, a.conditions, a.workers, not a.no_progress), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
