"""The quality bar of issue 4 (part 6), evaluated on the numbers of ``metrics/evaluate.json``.

Thresholds are the issue's and live here, in code, not in params: a run that misses the bar
reports ``"pass": false``; nobody lowers a threshold to pass.

| check | value | passes when |
|---|---|---|
| ``controlled_vs_uncontrolled/<c>`` | fidelity(c, its adapter) − fidelity(c, backbone without control) | value ≥ margin: 0.2 for segmentation (the issue's figure, mIoU), 0.1 for every other condition (primary metrics all lie in [0, 1]; "clearly" is the issue's word, 0.1 our reading of it) |
| ``adapter_vs_full_finetune/<c>`` | fidelity(adapter) / fidelity(full fine-tune) | value ≥ 0.90 |
| ``adapter_param_fraction/<c>`` | trainable params(adapter) / trainable params(full fine-tune) | value ≤ 0.15 |
| ``adapter_vs_random_base/<c>`` | fidelity(adapter on trained base) − fidelity(adapter on random base) | value > 0 (strictly beats) |
| ``combined_vs_single/<c>`` | fidelity(c in the combination) / fidelity(c alone) | value ≥ 0.90 (within 10 % of single; doing better than single also keeps it) |
| ``all`` | number of checks passed | value = threshold (the number of checks) |

Every check is ``{"value": float, "threshold": float, "pass": bool}``. A check whose inputs are
missing from the metrics is not skipped silently: it is reported with ``value`` ``None`` and
``"pass": false``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["CONTROL_MARGIN", "DEFAULT_CONTROL_MARGIN", "FULL_FINETUNE_RATIO", "PARAM_FRACTION", "COMBINED_RATIO",
           "evaluate_quality_bar"]

CONTROL_MARGIN: dict[str, float] = {"segmentation": 0.2}
DEFAULT_CONTROL_MARGIN = 0.1
FULL_FINETUNE_RATIO = 0.90
PARAM_FRACTION = 0.15
COMBINED_RATIO = 0.90


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _check(value: float | None, threshold: float, op: str) -> dict[str, Any]:
    if value is not None:
        value = round(value, 9)  # 0.7 - 0.5 is 0.19999999999999996: compare what is reported
    if value is None:
        ok = False
    elif op == ">=":
        ok = value >= threshold
    elif op == ">":
        ok = value > threshold
    elif op == "<=":
        ok = value <= threshold
    else:  # pragma: no cover - internal
        raise ValueError(op)
    return {"value": None if value is None else round(value, 6), "threshold": threshold, "pass": bool(ok)}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b <= 0:  # a non-positive reference makes a ratio meaningless: report it as failed
        return None
    return a / b


def evaluate_quality_bar(metrics: Mapping[str, Any], conditions: list[str], new_conditions: list[str],
                         baseline_condition: str | None, combined: list[str] | None) -> dict[str, dict]:
    """Quality-bar checks from an ``evaluate.json``-shaped dict.

    ``metrics[c]["fidelity"]`` for every condition ``c``; ``metrics["baselines"]["uncontrolled"][c]
    ["fidelity"]``; for ``baseline_condition`` (a new condition): ``metrics["baselines"]
    ["full_finetune"]`` and ``["random_base"]`` (``fidelity``, ``trainable_params``) and
    ``metrics[baseline_condition]["trainable_params"]``; ``metrics["combined"][c]["fidelity"]`` for
    ``c`` in ``combined``.
    """
    checks: dict[str, dict] = {}

    def fid(*path) -> float | None:
        node: Any = metrics
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                return None
            node = node[k]
        return _num(node)

    for c in conditions:
        ctrl, unc = fid(c, "fidelity"), fid("baselines", "uncontrolled", c, "fidelity")
        margin = CONTROL_MARGIN.get(c, DEFAULT_CONTROL_MARGIN)
        checks[f"controlled_vs_uncontrolled/{c}"] = _check(
            None if ctrl is None or unc is None else ctrl - unc, margin, ">=")

    if baseline_condition is not None:
        c = baseline_condition
        if c not in new_conditions:
            raise ValueError(f"the baselines' condition {c!r} must be a new condition {new_conditions}")
        ada = fid(c, "fidelity")
        checks[f"adapter_vs_full_finetune/{c}"] = _check(
            _ratio(ada, fid("baselines", "full_finetune", "fidelity")), FULL_FINETUNE_RATIO, ">=")
        checks[f"adapter_param_fraction/{c}"] = _check(
            _ratio(fid(c, "trainable_params"), fid("baselines", "full_finetune", "trainable_params")),
            PARAM_FRACTION, "<=")
        rnd = fid("baselines", "random_base", "fidelity")
        checks[f"adapter_vs_random_base/{c}"] = _check(None if ada is None or rnd is None else ada - rnd, 0.0, ">")

    for c in combined or []:
        checks[f"combined_vs_single/{c}"] = _check(
            _ratio(fid("combined", c, "fidelity"), fid(c, "fidelity")), COMBINED_RATIO, ">=")

    passed = sum(1 for v in checks.values() if v["pass"])
    checks["all"] = {"value": float(passed), "threshold": float(len(checks)), "pass": passed == len(checks)}
    return checks
