"""DVC stage ``detectors`` (params: ``evaluate.detector``, ``evaluate.detector_max_scans`` and the
condition lists of ``train_base`` / ``train_adapter``): the re-detectors that score condition
fidelity (segmentation, lighting, depth, normal), trained on the train split's photographs ->
``paths.detectors``.

A stage of its own because the detectors depend on the data alone: retraining a model (a new
base, an adapter, a retrain after new scans that leaves the split unchanged) reuses them, and the
production and research evaluations score with the very same detectors."""
from __future__ import annotations

import shutil
import sys
import time

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stage import artefact_paths, read_params, timed_stage


def main() -> int:
    from ctrlora.evaluation import run as evaluation

    allp, paths = read_params("evaluate", "train_base", "train_adapter"), artefact_paths()
    p = allp["evaluate"]
    conditions = [*allp["train_base"]["conditions"], *allp["train_adapter"]["conditions"]]
    if p.get("threads"):
        torch.set_num_threads(int(p["threads"]))
    progress = bool(p.get("progress", True))
    with timed_stage("detectors"):
        t = time.perf_counter()
        train = evaluation.load_split(paths["prepared"], "train", conditions, [paths["rendered"], paths["scans"]],
                                      p.get("detector_max_scans"), progress)
        print(f"[detectors] {len(train)} training scans ({time.perf_counter() - t:.1f} s)", flush=True)
        if paths["detectors"].exists():
            shutil.rmtree(paths["detectors"])
        paths["detectors"].mkdir(parents=True)
        got = evaluation.get_detectors(conditions, train, paths["detectors"], p.get("detector"), progress)
        print(f"[detectors] {sorted(got)} -> {paths['detectors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
