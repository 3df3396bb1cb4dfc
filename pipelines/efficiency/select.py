"""DVC stage ``select`` of the data-efficiency graph (params: ``efficiency``): per condition, per
tuned K (``efficiency.tune_k``) and per method, the learning rate with the highest mean fidelity
on the **validation** scans of the sweep (the research graph's rule,
:func:`pipelines.research.select.selection`); then, for every K of the curve, the rate of the
tuned K nearest to it in log K -> ``paths.metrics.efficiency_selection``
(``metrics/efficiency_sweep.json``), which ``train`` and ``evaluate`` read. Nothing here touches
the test split.

The record: ``tuned[condition][K][method]`` = the research selection (chosen rate, its validation
fidelity, ``at_edge``, every swept rate's mean and interval); ``rates[condition][K][method]`` =
``{learning_rate, tuned_at_k, at_edge}`` for every K of ``efficiency.k``.
"""
from __future__ import annotations

import sys
from typing import Any

from pipelines.efficiency import common as C
from pipelines.stages.common import timed_stage


def selection(sweep: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    from pipelines.research.select import selection as research_selection

    n_boot, seed = int(p["n_boot"]), int(p["bootstrap_seed"])
    tuned: dict[str, dict[str, Any]] = {}
    for c in p["conditions"]:
        tuned[c] = {}
        for k in p["tune_k"]:
            runs = [r for r in sweep["runs"] if r["condition"] == c and int(r["k"]) == k]
            if not runs:
                raise SystemExit(f"the sweep has no run of {c} at K = {k}; rerun `sweep`")
            one = {"split": sweep.get("split"), "condition": c, "n_scans": sweep["n_scans"][c], "runs": runs}
            tuned[c][str(k)] = research_selection(one, p["methods"], n_boot, seed)["methods"]
    rates = {c: {} for c in p["conditions"]}
    for c in p["conditions"]:
        for k in p["k"]:
            t = C.nearest_tuned_k(k, p["tune_k"])
            rates[c][str(k)] = {m: {"learning_rate": tuned[c][str(t)][m]["learning_rate"], "tuned_at_k": t,
                                    "at_edge": tuned[c][str(t)][m]["at_edge"]} for m in p["methods"]}
    return {"split": "validation", "n_scans": sweep["n_scans"], "k": p["k"], "tune_k": p["tune_k"],
            "rule": "per tuned K: highest mean validation fidelity (tie: the lower rate); every K takes the "
                    "choice of the tuned K nearest in log K (tie: the smaller tuned K)",
            "tuned": tuned, "rates": rates}


def main() -> int:
    p = C.params()
    with timed_stage("efficiency_select"):
        sweep = C.read_json(C.path(p, "efficiency") / "sweep" / "validation.json")
        out = selection(sweep, p)
        C.write_json(C.path(p, "metrics", "efficiency_selection"), out)
        for c, by_k in out["tuned"].items():
            for k, by_m in by_k.items():
                for m, e in by_m.items():
                    edge = "  (at the edge of the sweep)" if e["at_edge"] else ""
                    C.log(f"[efficiency select] {c} K={k} {m}: lr {e['learning_rate']:g}, validation fidelity "
                          f"{e['validation_fidelity']:.4f}{edge}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
