"""Reading the downstream-utility runs: per-arm gains over real-only training and what a generated
set is worth in real photographs.

Inputs are per-test-scan scores ``[seeds, scans]`` of segmenters (:mod:`.segmenter`), every run
scored on the same test photographs, so every comparison is paired over scans
(:mod:`ctrlora.evaluation.stats`). Training seeds are resampled with the scans
(``resample_seeds``): the seed changes the segmenter's initialisation, its batches *and* which N
real photographs it gets, so the interval covers "a team with another N photographs" as well.
With a handful of seeds that resample alone understates the seed spread, so every interval here
carries the small-seed correction of :mod:`ctrlora.evaluation.stats` (``seed_correction``).

**Real images worth** (:func:`real_images_worth`): the real-only learning curve (mean mIoU at
each N) is interpolated linearly in log N; the worth of an arm at N is the N' at which real-only
training reaches the arm's mean mIoU, minus N — how many more annotated photographs the
generated set stands in for. When the arm beats every point of the curve the worth is only known
to exceed the curve's last N (``above``), when it is below real-only at N it is ≤ 0. The curve is
made monotone first (running maximum), so a noisy dip cannot give two answers. Its interval
(:func:`worth_interval`) comes from the same paired, small-seed corrected resamples of scans
(and seeds) as the gains (:func:`ctrlora.evaluation.stats.two_level_means`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ctrlora.evaluation.stats import seed_rows, two_level_means

__all__ = ["real_images_worth", "worth_interval"]


def real_images_worth(curve_n: Sequence[int], curve_mean: Sequence[float], n: int, target: float) -> dict[str, Any]:
    """``{"equivalent_n": N' or None, "worth": N' - n or None, "above": bool, "below": bool}``
    for an arm at ``n`` real photographs whose mean score is ``target``."""
    ns = np.asarray(curve_n, dtype=np.float64)
    ms = np.maximum.accumulate(np.asarray(curve_mean, dtype=np.float64)[np.argsort(ns)])
    ns = np.sort(ns)
    if len(ns) < 2 or np.any(ns <= 0):
        raise ValueError(f"real_images_worth: need ≥ 2 positive N on the real-only curve, got {list(curve_n)}")
    if target > ms[-1]:
        return {"equivalent_n": None, "worth": None, "above": True, "below": False}
    if target < ms[0]:
        return {"equivalent_n": None, "worth": None, "above": False, "below": True}
    k = int(np.searchsorted(ms, target, side="left"))  # first curve point reaching the target
    if k == 0 or ms[k] == ms[k - 1]:
        eq = float(ns[k])
    else:
        t = (target - ms[k - 1]) / (ms[k] - ms[k - 1])
        eq = float(np.exp(np.log(ns[k - 1]) + t * (np.log(ns[k]) - np.log(ns[k - 1]))))
    return {"equivalent_n": eq, "worth": eq - float(n), "above": False, "below": False}


def worth_interval(curve: Mapping[int, Any], arm: Any, n: int, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95, seed_correction: bool = True) -> dict[str, Any]:
    """Worth of ``arm`` (per-scan scores ``[seeds, scans]``) at ``n`` on the real-only ``curve``
    (``{N: [seeds, scans]}``) with a percentile interval over joint resamples of scans (one scan
    draw shared by every array) and of each array's seed rows, each array's seed-level deviation
    stretched by the small-seed correction (ν pooled over the curve points and the arm) unless
    ``seed_correction=False`` (:func:`ctrlora.evaluation.stats.two_level_means`). A resample
    above the curve counts as +inf, below it as -inf, so the interval's ends say "more than the
    curve can tell" honestly."""
    keys = sorted(int(k) for k in curve)
    rows = [seed_rows(curve[k], f"curve N={k}") for k in keys]
    arm_rows = seed_rows(arm, "arm")
    n_scans = arm_rows.shape[1]
    if any(r.shape[1] != n_scans for r in rows):
        raise ValueError("worth_interval: every curve point and the arm must be scored on the same scans")
    *curve_means, arm_boot = two_level_means(rows + [arm_rows], n_boot, seed, level, seed_correction)
    curve_boot = np.stack(curve_means, axis=1)  # [n_boot, points]
    vals = np.empty(n_boot)
    for b in range(n_boot):
        w = real_images_worth(keys, curve_boot[b], n, float(arm_boot[b]))
        vals[b] = np.inf if w["above"] else (-np.inf if w["below"] else w["worth"])
    point = real_images_worth(keys, [r.mean() for r in rows], n, float(arm_rows.mean()))
    q = (1.0 - level) / 2.0
    lo = float(np.quantile(vals, q, method="lower"))
    hi = float(np.quantile(vals, 1.0 - q, method="higher"))

    def finite(v: float) -> float | str:
        return v if np.isfinite(v) else ("above_curve" if v > 0 else "below_curve")

    return {**point, "low": finite(lo), "high": finite(hi), "level": level, "n_boot": int(n_boot)}
