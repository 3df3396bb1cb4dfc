"""DVC stage ``report`` of the research graph (params: ``research``): the paired bootstrap
intervals of every comparison from ``<paths.research>/test_scores.json`` -> ``paths.metrics.research``
(``metrics/research.json``) and the embedding ablation's fidelity-vs-steps curve
(``<paths.reports.research>/ablation/fidelity_vs_steps.csv`` / ``.png``; the folder stays empty when the
methods leave the ablation out). Library: :mod:`ctrlora.evaluation.research`."""
from __future__ import annotations

import sys
from typing import Any

from pipelines import research_common as C
from pipelines.stage import timed_stage


def write_curves(abl: dict[str, Any], unc0: float, reports) -> None:
    """Seed-averaged fidelity per snapshot step (step 0 = uncontrolled) as CSV + PNG."""
    from ctrlora.evaluation.grids import plot_curves
    from ctrlora.evaluation.research import ABLATION

    curves = {m: [(0, unc0)] + [(int(s), abl[m]["fidelity"][str(s)]["value"]) for s in abl["steps"]] for m in ABLATION}
    lines = ["step," + ",".join(ABLATION)]
    for i, (step, _) in enumerate(curves[ABLATION[0]]):
        lines.append(f"{step}," + ",".join(f"{curves[m][i][1]:.6f}" for m in ABLATION))
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "fidelity_vs_steps.csv").write_text("\n".join(lines) + "\n")
    plot_curves(curves, reports / "fidelity_vs_steps.png", ylabel="fidelity",
                title=f"embedding ablation: fidelity vs steps on {abl['n_scans']} test scans (step 0 = no control)")


def main() -> int:
    import numpy as np

    from ctrlora.evaluation.research import research_report

    p = C.params()
    with timed_stage("research_report"):
        scores = C.read_json(C.path(p, "research") / "test_scores.json")
        sel = C.read_json(C.path(p, "metrics", "research_selection"))
        report = research_report(scores["uncontrolled"], scores["methods"], int(p["n_boot"]),
                                 int(p.get("bootstrap_seed", 0)))
        report = {"condition": scores["condition"], "split": scores["split"], "sampling": scores["sampling"],
                  "learning_rate_selection": {m: {k: sel["methods"][m][k] for k in ("learning_rate", "at_edge")}
                                              for m in p["methods"]},
                  **report}
        C.write_json(C.path(p, "metrics", "research"), report)
        abl = report.get("embedding_ablation")
        (C.path(p, "reports", "research") / "ablation").mkdir(parents=True, exist_ok=True)
        if abl:
            unc0 = float(np.mean(scores["uncontrolled"][: abl["n_scans"]]))
            write_curves(abl, unc0, C.path(p, "reports", "research") / "ablation")
        bar = report["quality_bar"]
        for name, chk in bar["checks"].items():
            C.log(f"[research report] {name}: {chk['value']} [{chk['low']}, {chk['high']}] vs {chk['threshold']}"
                  f" -> {'PASS' if chk['pass'] else 'FAIL'}")
        C.log(f"[research report] {bar['passed']}/{bar['total']} checks pass -> {C.path(p, 'metrics', 'research')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
