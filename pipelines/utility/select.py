"""DVC stage ``select`` of the utility graph: how many generated images to add, chosen on validation.

For every N of ``utility.n_real`` and each generated arm (with control, without control) the M of
``utility.m_grid`` with the highest mean validation mIoU (seed 0; tie -> the smaller M). The
uncontrolled arm is tuned by the same grid as the controlled one, so the control that tests
whether the masks' alignment matters gets the same tuning effort. Writes
``paths.metrics.utility_selection``: the choices, every configuration's validation mean with its
scan interval, and ``at_edge`` when a choice is the grid's smallest or largest M (the best M may
lie outside the grid: widen it).
The test split is not read.
"""
from __future__ import annotations

import sys

import numpy as np

from pipelines.utility import common as C


def main() -> int:
    from ctrlora.evaluation.stats import bootstrap_mean

    p = C.params()
    sweep = C.read_json(p["paths"]["utility"] / "sweep" / "validation.json")
    runs = {r["key"]: r for r in sweep["runs"]}
    boot = {"n_boot": int(p["n_boot"]), "seed": int(p["bootstrap_seed"])}
    validation = {k: {"n": r["n"], "arm": r["arm"], "m": r["m"],
                      **bootstrap_mean(np.asarray(r["validation"]), **boot).to_dict()}
                  for k, r in runs.items()}
    chosen: dict[str, dict[str, dict]] = {}
    at_edge = []
    for n in C.curve_n(p):
        chosen[str(n)] = {}
        for arm in p["arms"]:
            if arm != "real" and n not in p["n_real"]:
                continue
            if arm not in C.GENERATED_ARMS:
                key = C.Run(n, arm, 0, 0).key
                chosen[str(n)][arm] = {"m": 0, "validation": validation[key]["value"]}
                continue
            cands = sorted((-validation[C.Run(n, arm, int(m), 0).key]["value"], int(m)) for m in p["m_grid"])
            m = cands[0][1]
            chosen[str(n)][arm] = {"m": m, "validation": -cands[0][0]}
            if m in (min(int(x) for x in p["m_grid"]), max(int(x) for x in p["m_grid"])):
                at_edge.append(f"n{n}/{arm}")  # the best M may lie outside the grid: widen it
            C.log(f"[utility select] N={n} {arm}: M={m} (validation mIoU {-cands[0][0]:.3f})")
    out = p["paths"]["metrics"]["utility_selection"]
    C.write_json(out, {"split": "validation", "scans": len(sweep["scan_ids"]), "m_grid": p["m_grid"],
                       "chosen": chosen, "at_edge": at_edge, "validation": validation})
    C.log(f"[utility select] -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
