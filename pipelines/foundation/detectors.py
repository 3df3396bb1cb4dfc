"""Foundation stage ``detectors`` (params: ``detectors``): the re-detectors that score condition
fidelity (segmentation, lighting, depth, normal), trained on the foundation's training photographs
-> ``paths.detectors`` (committed).

They are the evaluation's yardstick, as the Inception network is FID's: trained once from the
rendered corpus and shipped, so every clone of a deployment, and every retrain after new scans,
scores with the very same detectors (the production and research evaluations, and the frozen
benchmark, which pins their hashes)."""
from __future__ import annotations

import shutil
import sys
import time

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stages.common import artefact_paths, read_params, timed_stage

KEYS = ("conditions", "max_scans", "config", "threads", "progress")  # params detectors: exactly these


def main() -> int:
    from ctrlora.evaluation.detector_cache import get_detectors
    from ctrlora.evaluation.fidelity import DETECTED_CONDITIONS
    from ctrlora.evaluation.loading import load_split
    from ctrlora.params import checked_section

    p, paths = checked_section("detectors", read_params("detectors"), KEYS), artefact_paths()
    conditions = list(p["conditions"])
    unknown = [c for c in conditions if c not in DETECTED_CONDITIONS]
    if unknown:
        raise SystemExit(f"params.yaml detectors.conditions: {unknown} have no re-detector "
                         f"(conditions scored by one: {sorted(DETECTED_CONDITIONS)})")
    torch.set_num_threads(int(p["threads"]))
    progress = bool(p["progress"])
    prepared = paths["foundation"]["prepared"]
    with timed_stage("foundation/detectors"):
        t = time.perf_counter()
        train = load_split(prepared, "train", conditions, [paths["rendered"]], p["max_scans"], progress)
        print(f"[detectors] {len(train)} training scans ({time.perf_counter() - t:.1f} s)", flush=True)
        if paths["detectors"].exists():
            shutil.rmtree(paths["detectors"])
        paths["detectors"].mkdir(parents=True)
        got = get_detectors(conditions, train, paths["detectors"], p["config"], progress)
        print(f"[detectors] {sorted(got)} -> {paths['detectors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
