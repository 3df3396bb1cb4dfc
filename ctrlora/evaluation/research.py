"""Research comparisons of the new-condition adapter against its baselines, with paired bootstrap
intervals over scans (training: :mod:`ctrlora.training.baselines`).

Scoring: :func:`run_scores` generates one image per scan with a model (one fixed sampling seed
per scan, shared by every model, :mod:`.generation`) and returns the per-scan primary fidelity of
the condition. Every model is scored on the same scans, so every comparison is paired.

Report (:func:`research_report`), from per-scan scores ``[seeds, scans]`` per method and
``[scans]`` for the uncontrolled backbone. Every interval about a method resamples its training
seeds as well as the scans (:mod:`.stats`, ``resample_seeds``): a claim that one recipe beats
another must hold across its seeds, not only on their average. Each check also records the
scans-only interval (seeds averaged first) beside it, and each method its per-seed means:

* per method: fidelity and gain over uncontrolled, each with its interval, and per-seed means;
* ``quality_bar``: the bar's research checks (format of :mod:`.quality_bar`), each passing only
  when the **lower end** of its 95 % interval clears the bar:
  ``adapter_vs_full_finetune`` (adapter gain / full fine-tune gain >= 0.9),
  ``adapter_param_fraction`` (exact, <= 0.15), ``adapter_vs_adapter_unet_copy`` and
  ``adapter_vs_adapter_random`` (difference > 0);
* two convergence comparisons (:func:`convergence_report`): the embedding ablation (``cnn`` vs
  ``vae_scratch``) and whether the trained base speeds learning (``adapter`` vs
  ``adapter_unet_copy``): fidelity per snapshot step, steps to 90 % of the final gain per method
  and seed, and the interval of the difference at every step.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .quality_bar import FULL_FINETUNE_RATIO, interval_check, missing_check, param_check
from .stats import bootstrap_diff, bootstrap_gain_ratio, bootstrap_mean

__all__ = ["run_scores", "steps_to_fraction", "research_report", "convergence_report", "ABLATION", "BASE_PAIR",
           "CONVERGENCE"]

ABLATION = ("cnn", "vae_scratch")
BASE_PAIR = ("adapter", "adapter_unet_copy")
# report key -> the two methods whose snapshots it compares
CONVERGENCE = {"embedding_ablation": ABLATION, "base_convergence": BASE_PAIR}


def run_scores(backbone, controlnet, adapter: str | None, condition: str, data, detectors: Mapping[str, Any],
               sampling, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W, 3], per-scan fidelity float64 [N])`` of ``controlnet`` driven by
    ``data``'s ``condition`` through ``adapter`` (``"__base__"`` = the ControlNet itself; ``None``
    = no control at all: the uncontrolled backbone). The images come from the production
    evaluation's generation path (:func:`.run.run_job`, one job over every scan at
    ``sampling.guidance_scale``): scan i gets seed ``sampling.seed + i``, as there."""
    from ctrlora.sampling import CtrLoRAPipeline

    from .run import UNCONTROLLED, GenerationJob, run_job
    from .scoring import per_scan_fidelity

    pipe = CtrLoRAPipeline.from_components(backbone, controlnet)
    pipe.set_progress_bar_config(disable=True)
    controls = {} if adapter is None else {condition: (condition, 1.0, adapter)}
    job = GenerationJob(guidance=float(sampling.guidance_scale), n_scans=len(data),
                        model=UNCONTROLLED if adapter is None else condition, controls=controls,
                        rows=tuple(range(len(data))))
    images = run_job(pipe, data, job, sampling, progress=progress)
    return images, np.asarray(per_scan_fidelity(condition, images, data, detectors), dtype=np.float64)


def steps_to_fraction(curve: Sequence[tuple[int, float]], fraction: float = 0.9) -> float | None:
    """First step of a fidelity curve (first point = step 0, no control) reaching ``fraction`` of
    its final gain; ``None`` when the curve gains nothing."""
    pts = sorted(curve)
    f0, gain = pts[0][1], pts[-1][1] - pts[0][1]
    if gain <= 1e-9:
        return None
    return float(next(s for s, f in pts if f - f0 >= fraction * gain - 1e-12))


def _iv(interval) -> dict[str, Any]:
    """Interval as a JSON-ready dict; a non-finite end (e.g. the -inf lower end of a gain ratio whose
    denominator gain is indistinguishable from zero) becomes ``None``."""
    return {k: ((round(v, 6) if np.isfinite(v) else None) if isinstance(v, float) else v)
            for k, v in interval.to_dict().items()}


def _beats(interval, seeds: int) -> dict[str, Any]:
    """"Strictly better" on a difference: the lower end of its interval lies above 0."""
    c = interval_check(interval, 0.0, seeds)
    c["pass"] = bool(c["pass"] and c["low"] > 0.0)
    return c


def research_report(uncontrolled: Sequence[float], methods: Mapping[str, Mapping[str, Any]],
                    n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Every figure of the research graph. ``methods[m]``: ``scores`` ``[seeds, scans]``,
    ``seeds``, ``learning_rate``, ``trainable_params``, ``total_params`` and, for the ablation
    methods, ``snapshots`` ``{step: [seeds, scans_subset]}``. Returns a JSON-ready dict."""
    unc = np.asarray(uncontrolled, dtype=np.float64)
    scores = {m: np.atleast_2d(np.asarray(v["scores"], dtype=np.float64)) for m, v in methods.items()}
    out: dict[str, Any] = {"n_scans": int(len(unc)), "n_boot": int(n_boot),
                           "uncontrolled": {"fidelity": _iv(bootstrap_mean(unc, n_boot, seed))}, "methods": {}}
    for m, v in methods.items():
        s = scores[m]
        out["methods"][m] = {
            "learning_rate": v.get("learning_rate"), "seeds": list(v.get("seeds", range(len(s)))),
            "trainable_params": v.get("trainable_params"), "total_params": v.get("total_params"),
            "fidelity": _iv(bootstrap_mean(s, n_boot, seed, resample_seeds=True)),
            "gain": _iv(bootstrap_diff(s, unc, n_boot, seed, resample_seeds=True)),
            "fidelity_per_seed": [round(float(r.mean()), 6) for r in s]}
    out["quality_bar"] = _checks(unc, scores, methods, n_boot, seed)
    for key, pair in CONVERGENCE.items():
        if all(m in methods and methods[m].get("snapshots") for m in pair):
            out[key] = convergence_report(unc, {m: methods[m]["snapshots"] for m in pair}, pair, n_boot, seed)
    return out


def _scans_only(interval) -> dict[str, Any]:
    return {k: v for k, v in _iv(interval).items() if k in ("low", "high")}


def _checks(unc, scores, methods, n_boot, seed) -> dict[str, Any]:
    """The bar's research checks (format of :mod:`.quality_bar`; a missing method fails its check),
    read on intervals over seeds and scans; ``scans_only`` keeps the seeds-averaged interval."""
    a = scores.get("adapter")
    checks: dict[str, Any] = {}
    ff = scores.get("full_finetune")
    boot = {"n_boot": n_boot, "seed": seed}
    if a is None or ff is None:
        checks["adapter_vs_full_finetune"] = missing_check(FULL_FINETUNE_RATIO)
    else:
        seeds = min(len(a), len(ff))
        checks["adapter_vs_full_finetune"] = {
            **interval_check(bootstrap_gain_ratio(a, ff, unc, **boot, resample_seeds=True), FULL_FINETUNE_RATIO,
                             seeds),
            "scans_only": _scans_only(bootstrap_gain_ratio(a, ff, unc, **boot)),
            "what": "gain(adapter) / gain(full_finetune), gains over uncontrolled; seeds and scans resampled"}
    size = lambda m: methods[m].get("trainable_params") if m in methods else None  # noqa: E731
    checks["adapter_param_fraction"] = {**param_check(size("adapter"), size("full_finetune")),
                                        "what": "trainable params(adapter) / trainable params(full_finetune)"}
    for other in ("adapter_unet_copy", "adapter_random"):
        name = f"adapter_vs_{other}"
        if a is None or other not in scores:
            checks[name] = missing_check(0.0)
            continue
        b = scores[other]
        checks[name] = {**_beats(bootstrap_diff(a, b, **boot, resample_seeds=True), min(len(a), len(b))),
                        "scans_only": _scans_only(bootstrap_diff(a, b, **boot)),
                        "what": f"fidelity(adapter) - fidelity({other}); seeds and scans resampled; "
                                "passes when low > 0"}
    passed = sum(bool(c["pass"]) for c in checks.values())
    return {"checks": checks, "passed": passed, "total": len(checks), "pass": passed == len(checks)}


def convergence_report(uncontrolled: Sequence[float] | np.ndarray, snapshots: Mapping[str, Mapping[int, Any]],
                       pair: tuple[str, str] = ABLATION, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Fidelity against training steps of the two methods of ``pair`` (``snapshots[m][step]``:
    ``[seeds, scans]`` on the first ``scans`` scans of ``uncontrolled``'s, step 0 = no control)."""
    a_name, b_name = pair
    snaps = {m: {int(s): np.atleast_2d(np.asarray(v, dtype=np.float64)) for s, v in snapshots[m].items()}
             for m in pair}
    steps = sorted(set(snaps[a_name]) & set(snaps[b_name]))
    if not steps:
        raise ValueError(f"{a_name} vs {b_name}: the two methods share no snapshot step")
    n = next(iter(snaps[a_name].values())).shape[-1]
    unc = np.asarray(uncontrolled, dtype=np.float64)[:n]
    out: dict[str, Any] = {"n_scans": int(n), "steps": steps, "step_0": "uncontrolled (no control)"}
    to90 = {}
    for m in pair:
        n_seeds = snaps[m][steps[0]].shape[0]
        per_seed = [steps_to_fraction([(0, float(unc.mean()))] + [(s, float(snaps[m][s][k].mean())) for s in steps])
                    for k in range(n_seeds)]
        to90[m] = per_seed
        out[m] = {"steps_to_90pct_per_seed": per_seed,
                  "fidelity": {str(s): _iv(bootstrap_mean(snaps[m][s], n_boot, seed, resample_seeds=True))
                               for s in steps}}
    out["difference"] = {str(s): _iv(bootstrap_diff(snaps[a_name][s], snaps[b_name][s], n_boot, seed,
                                                    resample_seeds=True)) for s in steps}
    out["difference_what"] = f"fidelity({a_name}) - fidelity({b_name}) at each step, seeds and scans resampled"
    out["converges_earlier"] = _earlier(to90, pair)
    return out


def _earlier(to90: Mapping[str, list[float | None]], pair: tuple[str, str]) -> str:
    """The method whose every seed reaches 90 % of its gain before every seed of the other, else
    ``"undecided"`` (a seed that never gains counts as never reaching it)."""
    a, b = pair
    big = float("inf")
    sa = [big if x is None else x for x in to90[a]]
    sb = [big if x is None else x for x in to90[b]]
    if max(sa) < min(sb):
        return a
    if max(sb) < min(sa):
        return b
    return "undecided"
