"""The promotion gate, as pure functions: does a new version beat the champion?

A gate is ``{metric, mode, min_delta}`` (params.yaml ``register.gate``; :data:`DEFAULT_GATE` when
absent). ``mode`` max: the new version passes when ``new >= champion + min_delta``; ``min``: when
``new <= champion - min_delta``. A version without the metric never passes on its own (it was not
evaluated), and the first version of a model passes when it has the metric.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

DEFAULT_GATE: dict[str, Any] = {"metric": "fidelity", "mode": "max", "min_delta": 0.0}
METRIC_TAG_PREFIX = "metric."   # a version's numbers are tags metric.<name>


def gate_config(gate: Mapping[str, Any] | None) -> dict[str, Any]:
    """``gate`` over the defaults, checked."""
    merged = {**DEFAULT_GATE, **(gate or {})}
    if merged["mode"] not in ("max", "min"):
        raise ValueError(f"gate mode must be 'max' or 'min', got {merged['mode']!r}")
    merged["min_delta"] = float(merged["min_delta"])
    return merged


def evaluate_gate(gate: Mapping[str, Any], new: float | None, champion: float | None,
                  champion_version: str | None) -> tuple[bool, str]:
    """(passes, reason with the numbers) for a version scoring ``new`` against the champion
    ``champion_version`` scoring ``champion`` (None: no champion yet)."""
    gate = gate_config(gate)
    metric, mode, delta = gate["metric"], gate["mode"], gate["min_delta"]
    if new is None:
        kept = f"champion v{champion_version} kept" if champion_version else "no champion set"
        return False, f"{metric} missing on this version (not evaluated?); {kept}"
    if champion_version is None:
        return True, f"no champion yet ({metric} {new:.6g})"
    if champion is None:
        return False, (f"champion v{champion_version} has no {metric} to compare with "
                       f"({metric}={new:.6g}); promote with force=True to replace it")
    if mode == "max":
        ok = new >= champion + delta
        sign = ">=" if ok else "<"
        bound = f"champion v{champion_version} {champion:.6g} + min_delta {delta:g}"
    else:
        ok = new <= champion - delta
        sign = "<=" if ok else ">"
        bound = f"champion v{champion_version} {champion:.6g} - min_delta {delta:g}"
    return ok, f"{metric} {new:.6g} {sign} {bound} (mode {mode})"


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
