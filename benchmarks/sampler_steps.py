"""Fidelity against sampling steps, per sampler, on the VALIDATION split of the trained default.

For every sampler of ``ctrlora.sampling.SCHEDULERS`` (DDIM, DPM-Solver++ 2M, DPM-Solver++ 2M with
Karras sigmas, UniPC) and every step count (default 4, 8, 12, 20, 50), each condition's adapter
generates one image per validation scan, and the image is scored as the ``evaluate`` stage scores
(``ctrlora.evaluation``: the condition's primary fidelity through its trained re-detector, per scan,
mean with its 95 % bootstrap interval over scans). Everything else is evaluate's: one fixed seed per
scan (``seed + i``, the same for every sampler and step count, so the comparisons are paired), the
gate guidance, the batch size. Also recorded per cell: seconds per image and the mean absolute
pixel difference to the same sampler at the largest step count (how far from converged).

The validation split is the one every default is chosen on; the test split stays evaluate's.

    # the trained default (models/ and data/ of `dvc repro`); the full curve, 64 scans
    .venv/bin/python benchmarks/sampler_steps.py
    # a quick look
    .venv/bin/python benchmarks/sampler_steps.py --scans 4 --steps 4 8 --schedulers ddim unipc
Options: ``--conditions lighting segmentation --scans 64 --guidance 1.0 --seed 1000 --batch 32
--threads 2 --device cpu|cuda --out FILE.json`` (default
``benchmarks/results/cpu_sampler_steps.json``). Paths come from ``params.yaml`` ``paths``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, add_validation_args, check_device, environment, params_yaml,  # noqa: E402
                     run_and_save, set_threads, trained_validation_setup)

DEFAULT_STEPS = (4, 8, 12, 20, 50)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu_sampler_steps.json"


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    from ctrlora.evaluation.generation import SamplingConfig, generate
    from ctrlora.evaluation.scoring import per_scan_fidelity
    from ctrlora.evaluation.stats import bootstrap_mean
    from ctrlora.sampling import SCHEDULERS

    check_device(args.device)
    threads = set_threads(args.device, args.threads)
    unknown = sorted(set(args.schedulers) - set(SCHEDULERS))
    if unknown:
        raise SystemExit(f"unknown sampler(s) {unknown}; known: {list(SCHEDULERS)}")
    params = params_yaml()
    data, detectors, pipe = trained_validation_setup(params, args.conditions, args.scans, args.device)
    steps = sorted(set(args.steps))
    print(f"{len(data)} validation scans, conditions {args.conditions}, samplers {args.schedulers}, steps {steps}",
          flush=True)

    cells = []
    for c in args.conditions:
        for sched in args.schedulers:
            images = {}
            for n in steps:
                cfg = SamplingConfig(steps=n, guidance_scale=args.guidance, scheduler=sched, batch_size=args.batch,
                                     seed=args.seed)
                t0 = time.perf_counter()
                images[n] = generate(pipe, data, {c: (c, 1.0, c)}, cfg, progress=False)
                seconds = time.perf_counter() - t0
                scores = per_scan_fidelity(c, images[n], data, detectors)
                iv = bootstrap_mean(scores, n_boot=args.n_boot, seed=0)
                cells.append({"condition": c, "scheduler": sched, "steps": n, "fidelity": round(float(iv.value), 6),
                              "low": round(float(iv.low), 6), "high": round(float(iv.high), 6),
                              "seconds_per_image": round(seconds / len(data), 5),
                              "per_scan": [round(float(x), 6) for x in scores]})
                print(f"{c:>13} {sched:>10} {n:>3} steps: fidelity {iv.value:.4f} [{iv.low:.4f}, {iv.high:.4f}] "
                      f"{seconds / len(data):.3f} s/image", flush=True)
            last = images[steps[-1]].astype(np.float64)
            for cell in cells[-len(steps):]:
                diff = np.abs(images[cell["steps"]].astype(np.float64) - last).mean()
                cell["mean_abs_diff_to_max_steps"] = round(float(diff), 4)
    return {
        "benchmark": "sampler_steps",
        "setup": {"split": "validation", "scans": len(data), "scan_ids": data.scan_ids,
                  "conditions": args.conditions, "schedulers": args.schedulers, "steps": steps,
                  "guidance": args.guidance, "seed": args.seed, "seed_rule": "scan i gets seed + i",
                  "batch": args.batch, "device": args.device, "threads": threads, "n_boot": args.n_boot,
                  "metric": "each condition's primary fidelity (evaluate's), mean over scans, 95 % bootstrap"},
        "results": cells,
        "environment": environment(args.device),
    }


def parse_args(argv=None) -> argparse.Namespace:
    ev = params_yaml()["evaluate"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conditions", nargs="+", default=["lighting", "segmentation"])
    p.add_argument("--schedulers", nargs="+", default=["ddim", "dpm", "dpm_karras", "unipc"])
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    add_validation_args(p, ev, scans=64)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if min(args.steps) < 1 or args.scans < 1:
        p.error("--steps and --scans must be >= 1")
    return args


def main(argv=None) -> dict:
    return run_and_save(run, parse_args(argv))


if __name__ == "__main__":
    main()
