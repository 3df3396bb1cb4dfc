"""DVC stage ``select`` of the research graph (params: ``research``): each method's learning rate,
the one with the highest mean fidelity on the **validation** scans of the sweep
(``<paths.research>/sweep/validation.json``) -> ``paths.metrics.research_selection`` (``metrics/research_sweep.json``),
which ``seeds`` and ``evaluate`` read. Nothing here touches the test split. Library:
:func:`ctrlora.training.baselines.select_learning_rates`."""
from __future__ import annotations

import sys
from typing import Any

from pipelines.research import common as C
from pipelines.stages.common import timed_stage


def selection(sweep: dict[str, Any], methods: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    """The selection record: per method the chosen rate and, per swept rate, the validation mean
    with its bootstrap interval over the validation scans (for reading, not for choosing)."""
    from ctrlora.evaluation.stats import bootstrap_mean
    from ctrlora.training.baselines import select_learning_rates

    if sweep.get("split") != "validation":
        raise SystemExit(f"the sweep was scored on {sweep.get('split')!r}; the learning rate is chosen on validation")
    runs = [r for r in sweep["runs"] if r["method"] in methods and r["seed"] == 0]
    means = {m: {r["learning_rate"]: r["mean"] for r in runs if r["method"] == m} for m in methods}
    chosen = select_learning_rates(means)
    for m, entry in chosen.items():
        entry["validation_intervals"] = {
            f"{r['learning_rate']:g}": bootstrap_mean(r["scores"], n_boot, seed).to_dict()
            for r in runs if r["method"] == m}
    return {"split": "validation", "condition": sweep["condition"], "n_scans": sweep["n_scans"],
            "rule": "highest mean validation fidelity (tie: the lower rate)", "methods": chosen}


def main() -> int:
    p = C.params()
    with timed_stage("research_select"):
        sweep = C.read_json(C.path(p, "research") / "sweep" / "validation.json")
        out = selection(sweep, list(p["methods"]), int(p["n_boot"]), int(p["bootstrap_seed"]))
        C.write_json(C.path(p, "metrics", "research_selection"), out)
        for m, e in out["methods"].items():
            edge = "  (at the edge of the sweep)" if e["at_edge"] else ""
            C.log(f"[research select] {m}: lr {e['learning_rate']:g}, validation fidelity "
                  f"{e['validation_fidelity']:.4f}{edge}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
