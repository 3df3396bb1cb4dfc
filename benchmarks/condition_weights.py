"""Each condition's gain over no control against its residual weight, on the VALIDATION split of
the trained default: the figures ``params.yaml`` ``evaluate.condition_weights`` and
``evaluate.combined`` were chosen on.

For every condition and every residual weight (the ControlNet conditioning scale, default 1, 2, 3),
the condition's adapter generates one image per validation scan and the image is scored as the
``evaluate`` stage scores it: the condition's primary fidelity through its trained re-detector, per
scan, minus the same figure for the image generated without control from the same seed, with the
paired 95 % bootstrap interval over scans. With ``--combined`` (default: evaluate's combination),
the combination runs at each weight too (every combined condition at that weight), and each combined
condition's gain ratio (combined gain / its single gain at the same weight) gets its interval.
Image PSNR / SSIM to the photograph are recorded beside each cell.

The rule the default follows is applied and recorded (``choice``): the smallest weight at which every
condition keeps >= 90 % of its best gain over the swept weights — one weight for all conditions, so
no grid noise is fitted per condition. Nothing reads the test split.

    # the trained default (models/ and data/ of `make repro`): 128 scans, weights 1 2 3
    .venv/bin/python benchmarks/condition_weights.py
    # a quick look
    .venv/bin/python benchmarks/condition_weights.py --scans 16 --weights 1 2 --conditions canny
Options: ``--conditions ... --weights 1 2 3 --combined segmentation lighting | --combined none
--scans 128 --guidance 1.0 --seed 1000 --batch 32 --threads 2 --device cpu|cuda --out FILE.json``
(default ``benchmarks/results/cpu_condition_weights.json``). Sampler, steps and guidance default to
evaluate's gate pass; paths come from ``params.yaml`` ``paths``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, add_validation_args, check_device, environment, params_yaml,  # noqa: E402
                     run_and_save, set_threads, trained_validation_setup)

DEFAULT_WEIGHTS = (1.0, 2.0, 3.0)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu_condition_weights.json"
KEEP = 0.9  # a weight is good enough for a condition when it keeps this share of the best gain


def _iv(iv) -> dict:
    return {"value": round(float(iv.value), 6), "low": round(float(iv.low), 6), "high": round(float(iv.high), 6)}


def choose(cells: list[dict], conditions: list[str], weights: list[float], keep: float = KEEP) -> dict:
    """The smallest weight at which every condition's gain is >= ``keep`` × its best gain over
    ``weights`` (``weight: None`` when no weight does, or when a condition's best gain is <= 0)."""
    gain = {(c["condition"], c["weight"]): c["gain"]["value"] for c in cells}
    best = {c: max(gain[(c, w)] for w in weights) for c in conditions}
    kept = {w: {c: (gain[(c, w)] / best[c] if best[c] > 0 else None) for c in conditions} for w in weights}
    ok = [w for w in sorted(weights) if all(k is not None and k >= keep for k in kept[w].values())]
    return {"rule": f"smallest weight keeping >= {keep:g} of every condition's best gain",
            "weight": ok[0] if ok else None, "best_gain": best,
            "kept": {str(w): {c: (round(k, 4) if k is not None else None) for c, k in kept[w].items()}
                     for w in weights}}


def sweep(pipe, data, detectors: dict, conditions: list[str], weights: list[float], sampling,
          combined: list[str] | None = None, n_boot: int = 2000, canny=None, log=print) -> dict:
    """Gain over no control per (condition, weight), and the combination's gain ratios per weight.

    ``pipe``: a :class:`~ctrlora.sampling.CtrLoRAPipeline` whose ControlNet carries an adapter
    named after each condition; ``data``: an :class:`~ctrlora.evaluation.loading.EvalData`;
    ``sampling``: a :class:`~ctrlora.evaluation.generation.SamplingConfig` (its guidance is used)."""
    from ctrlora.evaluation.generation import generate
    from ctrlora.evaluation.scoring import per_scan_image_scores, scan_scores
    from ctrlora.evaluation.fidelity import PRIMARY_METRIC
    from ctrlora.evaluation.stats import bootstrap_diff, bootstrap_gain_ratio

    def primary(c: str, images):
        return scan_scores(c, images, data, detectors, canny)[PRIMARY_METRIC[c]]

    def image_means(images) -> dict:
        return {k: round(float(v.mean()), 6) for k, v in per_scan_image_scores(images, data).items()}

    t0 = time.perf_counter()
    unc_images = generate(pipe, data, {}, sampling, progress=False)
    unc = {c: primary(c, unc_images) for c in conditions}
    cells, single = [], {}
    for c in conditions:
        for w in weights:
            images = generate(pipe, data, {c: (c, float(w), c)}, sampling, progress=False)
            single[(c, w)] = primary(c, images)
            iv = bootstrap_diff(single[(c, w)], unc[c], n_boot=n_boot, seed=0)
            cells.append({"condition": c, "weight": float(w), "metric": PRIMARY_METRIC[c],
                          "fidelity": round(float(single[(c, w)].mean()), 6),
                          "uncontrolled": round(float(unc[c].mean()), 6), "gain": _iv(iv), **image_means(images),
                          "per_scan_gain": [round(float(x), 6) for x in single[(c, w)] - unc[c]]})
            log(f"{c:>13} w {w:g}: gain {iv.value:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]")
    combos = []
    for w in weights if combined else []:
        images = generate(pipe, data, {c: (c, float(w), c) for c in combined}, sampling, progress=False)
        row = {"weight": float(w), "conditions": list(combined), **image_means(images)}
        for c in combined:
            comb = primary(c, images)
            row[c] = {"gain": _iv(bootstrap_diff(comb, unc[c], n_boot=n_boot, seed=0)),
                      "ratio": _iv(bootstrap_gain_ratio(comb, single[(c, w)], unc[c], n_boot=n_boot, seed=0))}
            log(f"{'+'.join(combined):>13} w {w:g}: {c} keeps {row[c]['ratio']['value']:.3f} "
                f"[{row[c]['ratio']['low']:.3f}, {row[c]['ratio']['high']:.3f}] of its single gain")
        combos.append(row)
    return {"cells": cells, "combined": combos, "choice": choose(cells, conditions, list(weights)),
            "uncontrolled": image_means(unc_images), "seconds": round(time.perf_counter() - t0, 1)}


def run(args: argparse.Namespace) -> dict:
    from ctrlora.evaluation.generation import SamplingConfig

    check_device(args.device)
    threads = set_threads(args.device, args.threads)
    params = params_yaml()
    ev = params["evaluate"]
    combined = args.combined
    unknown = sorted(set(combined or []) - set(args.conditions))
    if unknown:
        raise SystemExit(f"--combined names conditions not swept: {unknown} (add them to --conditions)")
    data, detectors, pipe = trained_validation_setup(params, args.conditions, args.scans, args.device)
    sampling = SamplingConfig(steps=int(ev["sampling"]["steps"]), scheduler=ev["sampling"]["scheduler"],
                              guidance_scale=args.guidance, batch_size=args.batch, seed=args.seed)
    print(f"{len(data)} validation scans, conditions {args.conditions}, weights {args.weights}, "
          f"combined {combined}, {sampling.scheduler} {sampling.steps} steps, guidance {args.guidance:g}", flush=True)
    result = sweep(pipe, data, detectors, args.conditions, args.weights, sampling, combined, args.n_boot,
                   log=lambda s: print(s, flush=True))
    print(f"choice: weight {result['choice']['weight']} ({result['choice']['rule']})")
    return {
        "benchmark": "condition_weights",
        "setup": {"split": "validation", "scans": len(data), "scan_ids": data.scan_ids,
                  "conditions": args.conditions, "weights": args.weights, "combined": combined,
                  "scheduler": sampling.scheduler, "steps": sampling.steps, "guidance": args.guidance,
                  "seed": args.seed, "seed_rule": "scan i gets seed + i", "batch": args.batch,
                  "device": args.device, "threads": threads, "n_boot": args.n_boot,
                  "params_in_use": {"condition_weights": ev.get("condition_weights", {}),
                                    "combined": ev.get("combined", {})},
                  "metric": "gain = primary fidelity (evaluate's) - the same without control, "
                            "paired 95 % bootstrap over scans"},
        **result,
        "environment": environment(args.device),
    }


def parse_args(argv=None) -> argparse.Namespace:
    params = params_yaml()
    ev = params["evaluate"]
    conditions = [*params["train_base"]["conditions"], *params["train_adapter"]["conditions"]]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conditions", nargs="+", default=conditions)
    p.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS))
    p.add_argument("--combined", nargs="+", default=list(ev.get("combined") or []),
                   help="conditions combined at each weight ('none' to skip)")
    add_validation_args(p, ev, scans=128)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.combined in (["none"], []):
        args.combined = None
    args.weights = sorted(set(args.weights))
    if args.scans < 1 or min(args.weights) <= 0:
        p.error("--scans must be >= 1 and every weight > 0")
    return args


def main(argv=None) -> dict:
    return run_and_save(run, parse_args(argv))


if __name__ == "__main__":
    main()
