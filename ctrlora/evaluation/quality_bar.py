"""Checks phase of the evaluation: the quality bar, read on paired bootstrap intervals.

Thresholds and the interval level are constants here, not params: a run that misses the bar
reports ``"pass": false``; nobody lowers a threshold (or the level) to pass. A check on an
interval passes **only when the lower end of its 95 % interval clears the threshold**, so a
figure whose uncertainty straddles the bar fails.

| check | value (interval over test scans) | passes when |
|---|---|---|
| ``controlled_vs_uncontrolled/<c>`` | mean(fidelity(c, its adapter) − fidelity(c, no control)), paired | low ≥ 0.20 for segmentation (image-level mIoU), ≥ 0.10 for every other condition (SSIM, edge F1) |
| ``combined_vs_single/<c>`` | (combined − uncontrolled) ÷ (single − uncontrolled) fidelity of ``c``, resampled jointly | low ≥ 0.90 |
| ``adapter_param_fraction/<c>`` | adapter parameters ÷ parameters of the full ControlNet (exact, no interval) | value ≤ 0.15 |

``FULL_FINETUNE_RATIO`` (adapter gain ÷ full fine-tune gain ≥ 0.90) is part of the same bar but
needs trained full-weight baselines; the research graph checks it with :func:`interval_check`.

Every check is ``{"value", "low", "high", "threshold", "n_scans", "seeds", "level", "pass"}``;
``seeds`` is the number of training seeds averaged per scan. A check whose inputs are missing is
not skipped silently: it is reported with ``value`` ``None`` and ``"pass": false``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .stats import Interval

__all__ = ["LEVEL", "CONTROL_MARGIN", "DEFAULT_CONTROL_MARGIN", "FULL_FINETUNE_RATIO", "PARAM_FRACTION",
           "COMBINED_RATIO", "control_margin", "interval_check", "param_check", "missing_check", "quality_bar"]

LEVEL = 0.95
CONTROL_MARGIN: dict[str, float] = {"segmentation": 0.2}
DEFAULT_CONTROL_MARGIN = 0.1
FULL_FINETUNE_RATIO = 0.90
PARAM_FRACTION = 0.15
COMBINED_RATIO = 0.90
_DIGITS = 6


def control_margin(condition: str) -> float:
    """The gain over uncontrolled that ``condition``'s primary fidelity must clear."""
    return CONTROL_MARGIN.get(condition, DEFAULT_CONTROL_MARGIN)


def _num(x: float | None) -> float | None:
    if x is None or not math.isfinite(float(x)):
        return None
    return round(float(x), _DIGITS)


def interval_check(iv: Interval, threshold: float, seeds: int = 1) -> dict[str, Any]:
    """A "at least ``threshold``" check on a bootstrap interval: passes when the lower end (as
    reported, rounded to 6 digits so that 0.7 − 0.5 reads 0.2) is ≥ ``threshold``. The interval
    must be a 95 % one."""
    if not math.isclose(iv.level, LEVEL):
        raise ValueError(f"quality-bar intervals are {LEVEL:.0%} intervals, got level {iv.level}")
    value, low, high = _num(iv.value), _num(iv.low), _num(iv.high)
    ok = value is not None and low is not None and low >= threshold
    return {"value": value, "low": low, "high": high, "threshold": threshold, "n_scans": int(iv.n),
            "seeds": int(seeds), "level": LEVEL, "pass": bool(ok)}


def param_check(adapter_params: int | None, controlnet_params: int | None) -> dict[str, Any]:
    """Adapter size ÷ full ControlNet size ≤ ``PARAM_FRACTION`` (exact counts: low = high = value)."""
    value = None
    if adapter_params is not None and controlnet_params:
        value = _num(adapter_params / controlnet_params)
    return {"value": value, "low": value, "high": value, "threshold": PARAM_FRACTION, "n_scans": None,
            "seeds": None, "level": None, "pass": bool(value is not None and value <= PARAM_FRACTION)}


def missing_check(threshold: float) -> dict[str, Any]:
    return {"value": None, "low": None, "high": None, "threshold": threshold, "n_scans": None, "seeds": None,
            "level": LEVEL, "pass": False}


def quality_bar(gains: Mapping[str, Interval], ratios: Mapping[str, Interval], adapter_params: Mapping[str, int],
                controlnet_params: int | None, *, conditions: Sequence[str], combined: Sequence[str],
                new_conditions: Sequence[str], seeds: int = 1) -> dict[str, Any]:
    """The bar over every expected check: ``controlled_vs_uncontrolled`` for each of
    ``conditions``, ``combined_vs_single`` for each of ``combined``, ``adapter_param_fraction``
    for each of ``new_conditions``. Returns ``{"checks": {name: check}, "passed", "total",
    "pass"}``; ``pass`` is true only when every check passes."""
    checks: dict[str, dict[str, Any]] = {}
    for c in conditions:
        name, thr = f"controlled_vs_uncontrolled/{c}", control_margin(c)
        checks[name] = interval_check(gains[c], thr, seeds) if c in gains else missing_check(thr)
    for c in combined:
        checks[f"combined_vs_single/{c}"] = (interval_check(ratios[c], COMBINED_RATIO, seeds) if c in ratios
                                             else missing_check(COMBINED_RATIO))
    for c in new_conditions:
        checks[f"adapter_param_fraction/{c}"] = param_check(adapter_params.get(c), controlnet_params)
    passed = sum(1 for v in checks.values() if v["pass"])
    return {"checks": checks, "passed": passed, "total": len(checks), "pass": bool(checks) and passed == len(checks)}
