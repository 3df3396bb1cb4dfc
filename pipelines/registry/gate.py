"""The promotion gate, as pure functions: does a new version beat the champion?

One decision lives here, :func:`paired_decision`: champion and challenger were scored in the same
run on the same frozen benchmark scans, seeds and re-detectors; the input is the paired
bootstrap interval of the mean per-scan difference (challenger - champion).
  ``rule: superiority`` promotes when the interval's lower end is above ``min_delta``;
  ``rule: noninferiority`` (for a retrain on changed data) promotes a version trained on other
  data than the champion when the lower end is above ``-margin`` and the mean difference is
  positive; a version trained on the champion's data is always held to superiority. An exact
  tie (every per-scan difference zero) never promotes.

Registration, ``ctrlora-ops registry promote`` and the studio's Promote all decide with it; no
path compares the means two versions carry from different runs. It reads params.yaml
``register.gate`` (:data:`DEFAULT_GATE` fills what is absent).

Both sides of a comparison are sampled at one residual weight, the challenger's recipe weight
(:func:`comparison_weight`): the weight the alias would serve if it moved. A stored comparison
records it (``gate_weight``) and is reused only at that weight (:func:`recorded_weight`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

DEFAULT_GATE: dict[str, Any] = {"min_delta": 0.0, "rule": "superiority", "margin": 0.0}
RULES = ("superiority", "noninferiority")
METRIC_TAG_PREFIX = "metric."   # a version's numbers are tags metric.<name>
# The residual weight of a version whose recipe names none (the registered model samples it so),
# and of a stored comparison without a ``gate_weight`` tag (those were all sampled at weight 1).
DEFAULT_WEIGHT = 1.0
WEIGHT_TAG = "gate_weight"


def gate_config(gate: Mapping[str, Any] | None) -> dict[str, Any]:
    """``gate`` over the defaults, checked: a negative ``min_delta`` or ``margin`` would let a
    version shown worse than its champion take the alias, so both are refused."""
    unknown = sorted(set(gate or {}) - set(DEFAULT_GATE))
    if unknown:
        raise ValueError(f"unknown gate settings {unknown}; known: {sorted(DEFAULT_GATE)}")
    merged = {**DEFAULT_GATE, **(gate or {})}
    if merged["rule"] not in RULES:
        raise ValueError(f"gate rule must be one of {RULES}, got {merged['rule']!r}")
    merged["min_delta"] = float(merged["min_delta"])
    merged["margin"] = float(merged["margin"])
    if merged["min_delta"] < 0:
        raise ValueError(f"gate min_delta must be >= 0 (a negative one promotes worse versions), got "
                         f"{merged['min_delta']}")
    if merged["margin"] < 0:
        raise ValueError(f"gate margin must be >= 0, got {merged['margin']}")
    return merged


def paired_decision(gate: Mapping[str, Any], value: float, low: float, high: float, *,
                    champion_version: str, same_data: bool, all_zero: bool = False,
                    level: float = 0.95) -> tuple[bool, str]:
    """(promote, reason with the numbers) from the paired interval ``[low, high]`` around the
    mean per-scan difference ``value`` = challenger - champion v``champion_version``.
    ``same_data``: both were trained on the same dataset hash (non-inferiority does not apply);
    ``all_zero``: every per-scan difference is exactly zero (a tie)."""
    gate = gate_config(gate)
    rule, delta, margin = gate["rule"], gate["min_delta"], gate["margin"]
    span = f"{value:+.6g} [{low:+.6g}, {high:+.6g}] ({level:.0%} paired bootstrap)"
    head = f"challenger - champion v{champion_version} = {span}"
    if all_zero:
        return False, f"{head}: identical on every benchmark scan (a tie); champion kept"
    if not (math.isfinite(value) and math.isfinite(low) and math.isfinite(high)):
        return False, f"{head}: interval undefined; champion kept"
    if rule == "noninferiority" and not same_data:
        ok = low > -margin and value > 0
        why = (f"non-inferior within margin {margin:g} and better on average"
               if ok else f"not shown non-inferior within margin {margin:g} with a positive mean "
                          "(lower end must be > -margin, mean > 0)")
    else:
        ok = low > delta
        basis = "superiority" if rule == "superiority" else "superiority (same data as the champion)"
        why = (f"lower end {low:+.6g} > min_delta {delta:g} ({basis})" if ok
               else f"lower end {low:+.6g} <= min_delta {delta:g} ({basis}): within noise or worse")
    return ok, f"{head}: {why}; " + ("promoted" if ok else "champion kept")


def comparison_weight(tags: Mapping[str, str], version: str) -> float:
    """The residual weight a comparison samples both sides at: the ``weight`` of the challenger's
    ``recipe`` tag (what the alias serves if it moves), :data:`DEFAULT_WEIGHT` when the version
    carries no recipe or its recipe names no weight. ``version`` names the version in errors; a
    recipe that is not JSON, or a weight that is not a finite number >= 0, is refused."""
    raw = tags.get("recipe")
    if raw is None:
        return DEFAULT_WEIGHT
    try:
        recipe = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{version}: its recipe tag is not JSON ({exc}); the comparison's weight "
                         "comes from it") from exc
    if not isinstance(recipe, Mapping):
        raise ValueError(f"{version}: its recipe tag is not a JSON object: {raw[:200]!r}")
    weight = recipe.get("weight", DEFAULT_WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or weight < 0:
        raise ValueError(f"{version}: recipe weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def recorded_weight(tags: Mapping[str, str]) -> float | None:
    """The residual weight a stored comparison sampled at: its ``gate_weight`` tag, or
    :data:`DEFAULT_WEIGHT` when it has none (recorded before the weight was; sampled at 1).
    An unreadable tag gives None, which matches no weight (the comparison is run again)."""
    raw = tags.get(WEIGHT_TAG)
    if raw is None:
        return DEFAULT_WEIGHT
    try:
        weight = float(raw)
    except (TypeError, ValueError):
        return None
    return weight if math.isfinite(weight) else None


def flatten_metrics(metrics: Mapping[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """Nested metrics → ``{"a.b": value}``, finite numbers only (booleans are not numbers)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    """Flat metrics as version tags (``repr`` keeps every digit)."""
    return {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items()}


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """The numbers a version carries as ``metric.<name>`` tags (unparseable ones are skipped)."""
    out = {}
    for key, raw in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key[len(METRIC_TAG_PREFIX):]] = float(raw)
            except (TypeError, ValueError):
                continue
    return out
