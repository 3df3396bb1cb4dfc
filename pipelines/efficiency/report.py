"""DVC stage ``report`` of the data-efficiency graph (params: ``efficiency``): intervals of every
point of the curve from ``<paths.efficiency>/test_scores.json`` -> ``paths.metrics.efficiency``
(``metrics/efficiency.json``) and ``<paths.reports.efficiency>/curve.png`` / ``curve.csv``
(fidelity gain over uncontrolled against K, one line per method, one panel per condition).

Intervals: paired percentile bootstrap (:mod:`ctrlora.evaluation.stats`) over the test scans,
with each method's training seeds resampled too (``resample_seeds=True``): one set of scan indices
per resample shared by every side, seed rows drawn per side. Per condition and K:

* each method's fidelity and its gain over uncontrolled, 95 %;
* ``adapter − <other method>`` for every other method: the per-point 95 % interval and the
  **family-wise** interval over the K of the curve (Bonferroni: level 1 − 0.05 / len(K)), so the
  family-wise intervals of one curve (one condition, one difference) hold together with ≥ 95 %
  coverage. Families are not corrected across conditions or differences.

The headline checks (recorded, never asserted): for each condition and each K of
``efficiency.headline_k``, ``adapter − adapter_unet_copy`` passes when the lower end of its
family-wise interval lies above 0.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines.efficiency import common as C
from pipelines.stages.common import timed_stage

ALPHA = 0.05      # 95 % per point; the family-wise level divides it by the number of K
REFERENCE = "adapter"
CONTROL = "adapter_unet_copy"  # the headline: does the trained base beat the weights anyone gets free


def _iv(interval) -> dict[str, Any]:
    """Interval as a JSON-ready dict, rounded; a non-finite end becomes ``None``."""
    return {k: ((round(v, 6) if np.isfinite(v) else None) if isinstance(v, float) else v)
            for k, v in interval.to_dict().items()}


def difference_name(other: str) -> str:
    return f"{REFERENCE} - {other}"


def efficiency_report(uncontrolled: Mapping[str, Sequence[float]], runs: Mapping[str, Mapping[str, Mapping[str, Any]]],
                      methods: Sequence[str], ks: Sequence[int], headline_k: Sequence[int], n_boot: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Every figure of the graph. ``uncontrolled[c]``: per-scan scores ``[scans]``;
    ``runs[c][str(K)][m]``: ``scores`` ``[seeds, scans]`` plus what to carry over (rate, seeds,
    parameter counts). Returns a JSON-ready dict."""
    from ctrlora.evaluation.stats import bootstrap_diff, bootstrap_mean

    ks = [int(k) for k in ks]
    family = 1.0 - ALPHA / len(ks)
    boot = {"n_boot": int(n_boot), "seed": int(seed), "resample_seeds": True}
    others = [m for m in methods if m != REFERENCE]
    out: dict[str, Any] = {
        "split": "test", "n_boot": int(n_boot), "k": ks, "level": 1.0 - ALPHA, "family_level": round(family, 6),
        "what": "paired percentile bootstrap over test scans with each method's training seeds resampled "
                "(the K pairs a seed draws, its initialisation and batches); `family` = Bonferroni over "
                "the K of one curve (one condition, one difference)",
        "conditions": {}}
    checks: dict[str, Any] = {}
    for c, by_k in runs.items():
        unc = np.asarray(uncontrolled[c], dtype=np.float64)
        entry: dict[str, Any] = {"n_scans": int(len(unc)),
                                 "uncontrolled": {"fidelity": _iv(bootstrap_mean(unc, int(n_boot), int(seed)))},
                                 "k": {}}
        for k in ks:
            point = by_k[str(k)]
            scores = {m: np.atleast_2d(np.asarray(point[m]["scores"], dtype=np.float64)) for m in methods}
            ms = {}
            for m in methods:
                s = scores[m]
                ms[m] = {**{key: v for key, v in point[m].items() if key != "scores"},
                         "fidelity": _iv(bootstrap_mean(s, **boot)), "gain": _iv(bootstrap_diff(s, unc, **boot)),
                         "fidelity_per_seed": [round(float(r.mean()), 6) for r in s]}
            diffs = {}
            for o in others:
                a, b = scores[REFERENCE], scores[o]
                fam = bootstrap_diff(a, b, **boot, level=family)
                diffs[difference_name(o)] = {**_iv(bootstrap_diff(a, b, **boot)), "seeds": min(len(a), len(b)),
                                             "family": {key: v for key, v in _iv(fam).items()
                                                        if key in ("low", "high", "level")}}
            entry["k"][str(k)] = {"methods": ms, "differences": diffs}
        out["conditions"][c] = entry
        for k in headline_k:
            name = f"{c}@k{int(k)}"
            if CONTROL not in methods:
                checks[name] = {"pass": False, "missing": CONTROL}
                continue
            d = entry["k"][str(int(k))]["differences"][difference_name(CONTROL)]
            low = d["family"]["low"]
            checks[name] = {"value": d["value"], "low": low, "high": d["family"]["high"],
                            "level": d["family"]["level"], "seeds": d["seeds"],
                            "pass": bool(low is not None and low > 0.0)}
    passed = sum(bool(c["pass"]) for c in checks.values())
    out["headline"] = {
        "what": f"fidelity({REFERENCE}) - fidelity({CONTROL}) at K = {list(headline_k)}: passes when the lower end "
                "of the family-wise interval (seeds and scans resampled) lies above 0",
        "checks": checks, "passed": passed, "total": len(checks)}
    return out


def write_curve(report: dict[str, Any], methods: Sequence[str], folder) -> None:
    """``curve.csv`` (long form) and ``curve.png``: gain over uncontrolled vs K with its 95 %
    interval, one line per method, one panel per condition, log x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    conds, ks = list(report["conditions"]), report["k"]
    lines = ["condition,k,method,fidelity,gain,gain_low,gain_high"]
    for c in conds:
        for k in ks:
            for m in methods:
                e = report["conditions"][c]["k"][str(k)]["methods"][m]
                lines.append(f"{c},{k},{m},{e['fidelity']['value']:.6f},{e['gain']['value']:.6f},"
                             f"{e['gain']['low']:.6f},{e['gain']['high']:.6f}")
    (folder / "curve.csv").write_text("\n".join(lines) + "\n")
    # a bare Figure on the Agg canvas: no pyplot, no global backend switch
    fig = Figure(figsize=(5 * len(conds), 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, c in enumerate(conds):
        ax = fig.add_subplot(1, len(conds), i + 1)
        for j, m in enumerate(methods):
            g = [report["conditions"][c]["k"][str(k)]["methods"][m]["gain"] for k in ks]
            x = [k * (1.0 + 0.03 * (j - (len(methods) - 1) / 2)) for k in ks]  # nudge so the bars do not overlap
            y = np.array([e["value"] for e in g])
            err = np.array([[e["value"] - e["low"] for e in g], [e["high"] - e["value"] for e in g]])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.minorticks_off()  # only the K that were run are labelled
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("training pairs K (log)")
        ax.set_ylabel("fidelity gain over uncontrolled")
        ax.set_title(f"{c}: {report['conditions'][c]['n_scans']} test scans, 95 % (seeds + scans)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "curve.png", format="png")


def main() -> int:
    p = C.params()
    with timed_stage("efficiency_report"):
        scores = C.read_json(C.path(p, "efficiency") / "test_scores.json")
        if scores.get("split") != "test":
            raise SystemExit(f"test_scores.json holds the {scores.get('split')!r} split, not test")
        report = efficiency_report(scores["uncontrolled"], scores["runs"], p["methods"], p["k"], p["headline_k"],
                                   int(p["n_boot"]), int(p["bootstrap_seed"]))
        report = {"sampling": scores["sampling"], **report}
        C.write_json(C.path(p, "metrics", "efficiency"), report)
        write_curve(report, p["methods"], C.path(p, "reports", "efficiency"))
        for name, chk in report["headline"]["checks"].items():
            if "missing" in chk:
                C.log(f"[efficiency report] {name}: no {chk['missing']} runs -> FAIL")
                continue
            verdict = "PASS" if chk["pass"] else "FAIL"
            C.log(f"[efficiency report] {name}: {REFERENCE} - {CONTROL} {chk['value']:+.4f} "
                  f"[{chk['low']}, {chk['high']}] (family-wise {chk['level']:.4f}) -> {verdict}")
        C.log(f"[efficiency report] {report['headline']['passed']}/{report['headline']['total']} headline checks "
              f"pass -> {C.path(p, 'metrics', 'efficiency')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
