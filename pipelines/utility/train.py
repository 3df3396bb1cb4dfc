"""DVC stages ``sweep`` and ``seeds`` of the utility graph: tooth segmenters trained on N real
photographs, alone, with classic augmentation, or with M generated images (with or without control).

``sweep``  seed 0 of every configuration (each N of ``utility.n_real`` × each arm, every M of
           ``utility.m_grid`` for the generated arms; real-only also at ``utility.curve_extra``),
           each scored on the **validation** split ->
           ``<paths.utility>/sweep/<key>/seed_0`` and ``<paths.utility>/sweep/validation.json``.
``seeds``  seeds 1 .. ``utility.seeds`` - 1 of the configuration ``select`` chose for every
           (N, arm) -> ``<paths.utility>/seeds/<key>/seed_<s>`` (seed 0 is the sweep's run).

Every run: the recipe of ``utility.segmenter``, the same steps and batch whatever the data; a
seed draws the real subset, the initialisation and the batches (:mod:`.common`). Runs go through
``utility.workers`` processes of ``utility.threads`` torch threads.
"""
from __future__ import annotations

import sys
from typing import Any

from pipelines.workers import pool_map
from pipelines.stages.common import timed_stage, write_curve
from pipelines.utility import common as C


def num_classes() -> int:
    """The segmenter's class count: the label table's (params labels), max id + 1."""
    from ctrlora.data.labels import num_classes as table_classes

    return table_classes()


def train_run(run: C.Run) -> Any:
    """Train ``run`` and save it (weights, config, loss curve); returns the model."""
    from ctrlora.downstream.segmenter import save_segmenter, segmenter_config, train_segmenter

    p, train, index = C.ctx("p"), C.ctx("train"), C.ctx("train_index")
    rows = [index[s] for s in C.real_ids(p, train.scan_ids, run.n, run.seed)]
    gx = gy = None
    if run.arm in C.GENERATED_ARMS:
        pool = C.ctx("pool")
        gx, gy = pool[C.GENERATED_ARMS[run.arm]][: run.m], pool["labels"][: run.m]
    cfg = segmenter_config(p["segmenter"], augment=run.arm in C.AUGMENTED_ARMS, seed=run.seed)
    model, losses = train_segmenter(train.photos[rows], train.labels[rows], num_classes(), cfg, gx, gy,
                                    desc=f"{run.key} seed {run.seed}")
    out = run.dir(p)
    save_segmenter(model, cfg, num_classes(), out)
    write_curve([{"step": i + 1, "loss": v} for i, v in enumerate(losses)], out / "loss.csv", ["loss"])
    return model


def sweep_job(run: C.Run) -> dict[str, Any]:
    from ctrlora.downstream.segmenter import score

    model = train_run(run)
    val = C.ctx("validation")
    s = score(model, val.photos, val.labels, num_classes())
    C.log(f"[utility sweep] {run.key}: validation mIoU {s.mean():.3f}")
    return {"key": run.key, "n": run.n, "arm": run.arm, "m": run.m, "validation": s}


def seed_job(run: C.Run) -> dict[str, Any]:
    train_run(run)
    C.log(f"[utility seeds] {run.key} seed {run.seed} done")
    return {"key": run.key, "seed": run.seed}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("sweep", "seeds"):
        raise SystemExit("usage: python -m pipelines.utility.train sweep|seeds")
    p = C.params()
    root = p["paths"]["utility"]
    with timed_stage(f"utility {argv[0]}"):
        if argv[0] == "sweep":
            runs = C.sweep_runs(p)
            C.log(f"[utility sweep] {len(runs)} segmenters (seed 0) -> {root / 'sweep'}")
            res = pool_map(sweep_job, runs, ("train", "validation", "pool"), p["workers"], p["threads"], init=C.setup)
            C.write_json(root / "sweep" / "validation.json",
                         {"scan_ids": C.load(p, "validation", p["validation_scans"]).scan_ids, "runs": res})
        else:
            selection = C.read_json(p["paths"]["metrics"]["utility_selection"])
            runs = C.chosen_runs(p, selection, range(1, int(p["seeds"])))
            C.log(f"[utility seeds] {len(runs)} segmenters -> {root / 'seeds'}")
            (root / "seeds").mkdir(parents=True, exist_ok=True)
            pool_map(seed_job, runs, ("train", "pool"), p["workers"], p["threads"], init=C.setup)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
