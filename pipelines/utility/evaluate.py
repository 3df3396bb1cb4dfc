"""DVC stage ``evaluate`` of the utility graph: the chosen segmenters on the real **test** split.

Every selected configuration (``paths.metrics.utility_selection``) at every seed is scored on the
same test photographs (per-image mIoU against the annotators' label maps), so all comparisons are
paired over test scans; intervals resample the training seeds as well (:mod:`ctrlora.downstream.curves`).

Writes ``paths.metrics.utility``:

* per N and arm: test mIoU (interval, per-seed means), the gain over real-only training at the
  same N with its 95 % interval and its family-wise interval (Bonferroni over the N of the
  curve: read that one when reading the curve as a whole), and for the generated arms the
  "real images worth" (:func:`ctrlora.downstream.curves.worth_interval`);
* ``headline`` at ``utility.headline_n``: the generated set's gain over real only, its gain over
  the uncontrolled-generation control and over classic augmentation, with the two checks of the
  bar (lower ends > 0);

and ``<paths.reports.utility>/curve.png`` (mIoU vs N), ``curve.csv`` (DVC plots),
``predictions.png`` (a few test photographs segmented by each arm's seed-0 model at the headline N),
``<paths.utility>/test_scores.json`` (every run's per-scan test mIoU).
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from pipelines.stages.common import timed_stage
from pipelines.utility import common as C

LABELS = {"real": "real only", "real_aug": "real + augmentation", "real_gen": "real + generated (with control)",
          "real_gen_uncontrolled": "real + generated (without control)",
          "real_aug_gen": "real + augmentation + generated"}


def _plot(p: dict[str, Any], table: dict[str, dict[str, Any]], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for arm in p["arms"]:
        ns = [int(n) for n in table if arm in table[n]]
        iv = [table[str(n)][arm]["miou"] for n in ns]
        y = np.array([v["value"] for v in iv])
        err = np.array([[v["value"] - v["low"], v["high"] - v["value"]] for v in iv]).T
        ax.errorbar(ns, y, yerr=err, marker="o", capsize=3, label=LABELS.get(arm, arm))
    ax.set_xscale("log")
    ax.minorticks_off()  # only the N that were run are labelled
    ax.set_xticks(C.curve_n(p), [str(n) for n in C.curve_n(p)])
    ax.set_xlabel("real annotated photographs (N)")
    ax.set_ylabel("test mIoU (mean over seeds, 95 % interval)")
    ax.set_title("tooth segmenter trained with few real photographs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def main() -> int:
    from ctrlora.downstream.curves import worth_interval
    from ctrlora.downstream.segmenter import load_segmenter, predict, score
    from ctrlora.evaluation.grids import colorize_labels, save_grid
    from ctrlora.evaluation.stats import bootstrap_diff, bootstrap_mean

    p = C.params()
    torch.set_num_threads(max(1, int(p["workers"]) * int(p["threads"])))
    selection = C.read_json(p["paths"]["metrics"]["utility_selection"])
    seeds = list(range(int(p["seeds"])))
    runs = C.chosen_runs(p, selection, seeds)
    with timed_stage("utility evaluate"):
        test = C.load(p, "test", p["test_scans"])
        assert test.labels is not None
        scores: dict[str, np.ndarray] = {}
        models: dict[str, Any] = {}
        for run in runs:
            model, _, k = load_segmenter(run.dir(p))
            s = score(model, test.photos, test.labels, k)
            arr = scores.setdefault(f"{run.n}/{run.arm}", np.zeros((len(seeds), len(test))))
            arr[run.seed] = s
            if run.seed == 0 and run.n == int(p["headline_n"]):
                models[run.arm] = model
        C.write_json(p["paths"]["utility"] / "test_scores.json",
                     {"scan_ids": test.scan_ids, "runs": {k: v for k, v in scores.items()}})
        boot = {"n_boot": int(p["n_boot"]), "seed": int(p["bootstrap_seed"]), "resample_seeds": True}
        family = 1.0 - 0.05 / len(p["n_real"])
        curve = {n: scores[f"{n}/real"] for n in C.curve_n(p)}
        table: dict[str, dict[str, Any]] = {}
        for n in C.curve_n(p):
            table[str(n)] = {}
            for arm in p["arms"]:
                key = f"{n}/{arm}"
                if key not in scores:
                    continue
                s = scores[key]
                row: dict[str, Any] = {"m": int(selection["chosen"][str(n)][arm]["m"]),
                                       "miou": bootstrap_mean(s, **boot).to_dict(),
                                       "per_seed": [float(v) for v in s.mean(axis=1)]}
                if arm != "real":
                    row["gain"] = bootstrap_diff(s, scores[f"{n}/real"], **boot).to_dict()
                    row["gain_family"] = bootstrap_diff(s, scores[f"{n}/real"], level=family, **boot).to_dict()
                if arm in C.GENERATED_ARMS:
                    row["worth"] = worth_interval(curve, s, n, n_boot=int(p["n_boot"]), seed=int(p["bootstrap_seed"]))
                table[str(n)][arm] = row
        n0 = int(p["headline_n"])
        gen = scores[f"{n0}/real_gen"] if "real_gen" in p["arms"] else None
        headline: dict[str, Any] = {"n": n0}
        if gen is not None:
            headline["gain"] = table[str(n0)]["real_gen"]["gain"]
            headline["worth"] = table[str(n0)]["real_gen"]["worth"]
            for other in ("real_gen_uncontrolled", "real_aug"):
                if other in p["arms"]:
                    headline[f"vs_{other}"] = bootstrap_diff(gen, scores[f"{n0}/{other}"], **boot).to_dict()
            if {"real_aug_gen", "real_aug"} <= set(p["arms"]):  # does generating add to augmentation?
                headline["augmented_vs_real_aug"] = bootstrap_diff(scores[f"{n0}/real_aug_gen"],
                                                                   scores[f"{n0}/real_aug"], **boot).to_dict()
            checks = {"gain_above_zero": headline["gain"]["low"] > 0}
            if "vs_real_gen_uncontrolled" in headline:
                checks["above_uncontrolled_control"] = headline["vs_real_gen_uncontrolled"]["low"] > 0
            headline["checks"] = checks
        metrics = {"test_scans": len(test), "seeds": len(seeds), "level": 0.95, "family_level": family,
                   "interval": "paired percentile bootstrap over test scans and training seeds, "
                               "small-seed corrected (ctrlora.evaluation.stats.seed_scales)",
                   "pool": int(p["pool"]), "headline": headline, "n": table}
        out = p["paths"]["metrics"]["utility"]
        C.write_json(out, metrics)
        report = p["paths"]["reports"]["utility"]
        report.mkdir(parents=True, exist_ok=True)
        _plot(p, table, report / "curve.png")
        lines = ["n,arm,miou,low,high"] + [f"{n},{arm},{r['miou']['value']:.6f},{r['miou']['low']:.6f},"
                                          f"{r['miou']['high']:.6f}" for n, rows in table.items()
                                          for arm, r in rows.items()]
        (report / "curve.csv").write_text("\n".join(lines) + "\n")
        k = min(6, len(test))
        arms = [a for a in p["arms"] if a in models]
        cells = [[test.photos[i], colorize_labels(test.labels[i])]
                 + [colorize_labels(predict(models[a], test.photos[i:i + 1])[0]) for a in arms] for i in range(k)]
        save_grid(cells, report / "predictions.png", titles=["photo", "annotation"] + arms)
        for a in arms:
            r = table[str(n0)][a]
            C.log(f"[utility evaluate] N={n0} {a}: mIoU {r['miou']['value']:.3f}"
                  + (f", gain {r['gain']['value']:+.3f} [{r['gain']['low']:+.3f}, {r['gain']['high']:+.3f}]"
                     if "gain" in r else ""))
        C.log(f"[utility evaluate] -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
