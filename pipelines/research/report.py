"""DVC stage ``report`` of the research graph (params: ``research``): the paired bootstrap
intervals of every comparison from ``<paths.research>/test_scores.json`` -> ``paths.metrics.research``
(``metrics/research.json``) and the fidelity-vs-steps curves of the two convergence comparisons in
``<paths.reports.research>/ablation/``: the embedding ablation (``fidelity_vs_steps.csv`` / ``.png``)
and the trained base against the UNet copy (``base_vs_unet_copy.csv`` / ``.png``); a comparison
whose methods are left out writes nothing. Library: :mod:`ctrlora.evaluation.research`."""
from __future__ import annotations

import sys
from typing import Any

from pipelines.research import common as C
from pipelines.stages.common import timed_stage


# report key -> (file stem in the ablation folder, plot title)
CURVES = {"embedding_ablation": ("fidelity_vs_steps", "embedding ablation"),
          "base_convergence": ("base_vs_unet_copy", "base vs UNet copy")}


def write_curves(conv: dict[str, Any], pair: tuple[str, str], unc0: float, reports, stem: str, what: str) -> None:
    """Seed-averaged fidelity per snapshot step (step 0 = uncontrolled) as ``<stem>.csv`` + ``.png``."""
    from ctrlora.evaluation.grids import plot_curves

    curves = {m: [(0, unc0)] + [(int(s), conv[m]["fidelity"][str(s)]["value"]) for s in conv["steps"]] for m in pair}
    lines = ["step," + ",".join(pair)]
    for i, (step, _) in enumerate(curves[pair[0]]):
        lines.append(f"{step}," + ",".join(f"{curves[m][i][1]:.6f}" for m in pair))
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{stem}.csv").write_text("\n".join(lines) + "\n")
    plot_curves(curves, reports / f"{stem}.png", ylabel="fidelity",
                title=f"{what}, {conv['n_scans']} test scans (step 0: no control)")


def main() -> int:
    import numpy as np

    from ctrlora.evaluation.research import CONVERGENCE, research_report

    p = C.params()
    with timed_stage("research_report"):
        scores = C.read_json(C.path(p, "research") / "test_scores.json")
        sel = C.read_json(C.path(p, "metrics", "research_selection"))
        report = research_report(scores["uncontrolled"], scores["methods"], int(p["n_boot"]),
                                 int(p["bootstrap_seed"]))
        report = {"condition": scores["condition"], "split": scores["split"], "sampling": scores["sampling"],
                  "learning_rate_selection": {m: {k: sel["methods"][m][k] for k in ("learning_rate", "at_edge")}
                                              for m in p["methods"]},
                  **report}
        C.write_json(C.path(p, "metrics", "research"), report)
        folder = C.path(p, "reports", "research") / "ablation"
        folder.mkdir(parents=True, exist_ok=True)
        for key, (stem, what) in CURVES.items():
            conv = report.get(key)
            if conv:
                unc0 = float(np.mean(scores["uncontrolled"][: conv["n_scans"]]))
                write_curves(conv, CONVERGENCE[key], unc0, folder, stem, what)
        bar = report["quality_bar"]
        for name, chk in bar["checks"].items():
            C.log(f"[research report] {name}: {chk['value']} [{chk['low']}, {chk['high']}] vs {chk['threshold']}"
                  f" -> {'PASS' if chk['pass'] else 'FAIL'}")
        C.log(f"[research report] {bar['passed']}/{bar['total']} checks pass -> {C.path(p, 'metrics', 'research')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
