"""DVC stage ``generate`` of the utility graph: the generated photographs a team would add to its
annotated set.

For each pool scan (training split, held out of every real subset; :mod:`.common`) one photograph
is drawn from its mask by the production model — the backbone, the Base ControlNet and its
``utility.condition`` adapter at the evaluation's recipe (sampler, steps, gate guidance, residual
weight) — and one by the backbone alone with the same caption and sampling seed. Both are
labelled by the pool scan's mask. Only the masks and captions of the pool are read, never its
photographs.

Writes ``<paths.utility_data>/pool.npz`` (``controlled``, ``uncontrolled``: uint8 N×H×W×3;
``labels``: uint8 N×H×W; ``source``: each image's index in the training split, for the audit) and
``<paths.utility_data>/pool.json`` (scan ids, recipe), and a contact sheet
``<paths.reports.utility>/generated.png`` (mask | with control | without control).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

from pipelines.settings import BASE_ADAPTERS
from pipelines.stages.common import timed_stage
from pipelines.utility import common as C


def adapter_dir(p: dict, condition: str):
    """The production adapter of ``condition``: a base condition's (``<base>/adapters/<c>``) or a
    new condition's (``<adapters>/<c>``)."""
    roots = [p["paths"]["base"] / BASE_ADAPTERS, p["paths"]["adapters"]]
    for root in roots:
        if (root / condition / "adapter_config.json").is_file():
            return root / condition
    raise SystemExit(f"utility: no trained {condition!r} adapter under {[str(r) for r in roots]}; "
                     "run the production graph (`make repro`) first")


def main() -> int:
    from ctrlora.evaluation.generation import SamplingConfig, generate
    from ctrlora.evaluation.grids import colorize_labels, save_grid
    from ctrlora.evaluation.loading import EvalData, load_models
    from ctrlora.sampling import CtrLoRAPipeline

    p = C.params()
    torch.set_num_threads(max(1, int(p["workers"]) * int(p["threads"])))
    c = p["condition"]
    with timed_stage("utility generate"):
        train = C.load(p, "train")
        ids = C.pool_ids(p, train.scan_ids)
        index = {sid: i for i, sid in enumerate(train.scan_ids)}
        source = np.array([index[s] for s in ids], dtype=np.int64)
        assert train.labels is not None
        # the pool gives masks and captions only: its photographs are not carried
        pool = EvalData(list(ids), [train.captions[i] for i in source], np.zeros((0, 1, 1, 3), np.uint8),
                        {c: train.conditions[c][source]}, train.labels[source])
        models = load_models(C.backbone_dir(p), p["paths"]["base"], {c: adapter_dir(p, c)})
        pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet)
        pipe.set_progress_bar_config(disable=True)
        s = p["sampling"]
        cfg = SamplingConfig(steps=int(s["steps"]), guidance_scale=float(s["guidance_scale"]),
                             scheduler=str(s["scheduler"]), batch_size=int(s["batch_size"]),
                             seed=int(p["generation_seed"]))
        controlled = generate(pipe, pool, {c: (c, p["weight"], c)}, cfg, desc="generate with control")
        uncontrolled = generate(pipe, pool, {}, cfg, desc="generate without control")
        out = p["paths"]["utility_data"]
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "pool.npz", controlled=controlled, uncontrolled=uncontrolled,
                 labels=pool.labels.astype(np.uint8), source=source)
        (out / "pool.json").write_text(json.dumps({
            "scan_ids": ids, "condition": c, "weight": p["weight"], "sampling": {**s, "seed": cfg.seed},
        }, indent=1) + "\n")
        rows = min(8, len(ids))
        cells = [[colorize_labels(pool.labels[i]), controlled[i], uncontrolled[i]] for i in range(rows)]
        report = p["paths"]["reports"]["utility"]
        report.mkdir(parents=True, exist_ok=True)
        save_grid(cells, report / "generated.png", titles=["mask", "with control", "without control"])
        print(f"[utility generate] {len(ids)} masks -> {out / 'pool.npz'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
