"""How often the research graph's "A beats B" rule passes when A and B are equally good.

The research report calls a difference a win when the lower end of its 95 % interval from
``ctrlora.evaluation.stats.bootstrap_diff(..., resample_seeds=True)`` (seeds and scans resampled)
lies above 0. At a true difference of zero that should happen about 2.5 % of the time (the
interval's lower tail). With few training seeds per method, resampling k seed rows out of k
understates the seed-to-seed spread, so the plain two-level bootstrap passes more often; the
function's small-seed correction (``seed_correction``, on by default) is meant to bring the rate
back to nominal. This script measures both by simulation, calling the project's own function, for
several seed counts.

Simulated per-scan scores, for method m in {A, B}, seed k and scan i:

    score = difficulty_i + offset_{m,k} + noise_{m,k,i}

* ``difficulty_i`` is shared by both methods (the pairing over scans; it cancels in A − B);
* ``offset_{m,k}`` ~ N(0, seed_sd²): how far a training seed moves a method's mean;
* ``noise_{m,k,i}`` ~ N(0, scan_sd²): per-scan scatter, independent across seeds and methods.

Both methods share the same mean, so every "lower end > 0" is a false positive. By default the
two spreads are read from the committed ``metrics/research.json``:

* ``seed_sd``: the pooled within-method standard deviation of the per-seed mean fidelities
  (``methods.<m>.fidelity_per_seed``), less the part per-scan noise adds to a mean over the scans;
* ``scan_sd``: from the scans-only intervals of the two "adapter vs" checks
  (``quality_bar.checks.<c>.scans_only``): their width ÷ (2 × 1.96) is the standard error of a
  difference of seed-averaged means, which is ``scan_sd × sqrt((1/k_a + 1/k_b) / n_scans)``.

Each replicate draws fresh scores and uses its own bootstrap seed. Recorded per seed count: the
rate with the correction (``false_positive_rate``, what the research report uses), without it
(``uncorrected_false_positive_rate``), and the same rule on the scans-only interval (``resample_seeds=False``: seeds averaged first), which ignores the seed
spread altogether. Rates carry a 95 % Wilson interval for the Monte Carlo error.

    .venv/bin/python benchmarks/seed_bootstrap_calibration.py          # -> results/seed_bootstrap_calibration.json
    .venv/bin/python benchmarks/seed_bootstrap_calibration.py --reps 200 --out /tmp/x.json   # a quick look
Options: ``--seeds 2 3 5 --reps 500 --scans 200 --n-boot 2000 --seed-sd SD --scan-sd SD
--metrics metrics/research.json --rng-seed 0 --out FILE.json``. numpy on one thread; ~1 min on a
2-core CPU at the defaults.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, save_json  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "seed_bootstrap_calibration.json"
DEFAULT_METRICS = ROOT / "metrics" / "research.json"
NOMINAL = 0.025          # one-sided error of "the 95 % interval's lower end > 0" at a zero difference
DIFFICULTY_SD = 0.1      # per-scan difficulty; cancels in every paired difference, kept for realism
Z975 = 1.959964


def spreads_from_metrics(path: Path) -> dict:
    """``seed_sd`` and ``scan_sd`` as the committed research metrics imply them (module docstring)."""
    m = json.loads(Path(path).read_text())
    n_scans = int(m["n_scans"])
    checks = m["quality_bar"]["checks"]
    scan_vars = []
    for name, c in checks.items():
        if not name.startswith("adapter_vs_adapter_"):  # the differences (the ratio check is no difference)
            continue
        so, k = c.get("scans_only"), c.get("seeds")
        if not so or not k or so.get("low") is None or so.get("high") is None:
            continue
        se = (so["high"] - so["low"]) / (2 * Z975)
        # the check's ``seeds`` is min(k_a, k_b); the research graph trains every method with as many
        scan_vars.append(se ** 2 * n_scans / (2.0 / k))
    if not scan_vars:
        raise SystemExit(f"{path}: no difference check with a scans-only interval to read the per-scan spread from")
    scan_var = sum(scan_vars) / len(scan_vars)
    # pooled variance of per-seed means (each method's unbiased variance, weighted by its degrees of freedom)
    num = den = 0
    per_method = {}
    for name, v in m["methods"].items():
        xs = v.get("fidelity_per_seed") or []
        if len(xs) < 2:
            continue
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
        per_method[name] = {"per_seed": xs, "sd": math.sqrt(var)}
        num, den = num + var * (len(xs) - 1), den + len(xs) - 1
    if not den:
        raise SystemExit(f"{path}: no method with two or more seeds to read the seed spread from")
    seed_var = max(num / den - scan_var / n_scans, 0.0)
    return {"seed_sd": math.sqrt(seed_var), "scan_sd": math.sqrt(scan_var), "n_scans": n_scans,
            "seed_sd_degrees_of_freedom": den, "per_method": per_method,
            "source": str(Path(path).resolve().relative_to(ROOT)) if Path(path).resolve().is_relative_to(ROOT)
            else str(path)}


def wilson(hits: int, n: int, z: float = Z975) -> list[float]:
    """95 % Wilson interval of a proportion (the Monte Carlo error of a measured rate)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def simulate(seeds: int, reps: int, scans: int, n_boot: int, seed_sd: float, scan_sd: float,
             rng_seed: int = 0) -> dict:
    """False-positive rates of "lower end > 0" at a zero true difference, ``seeds`` rows a side."""
    import numpy as np

    from ctrlora.evaluation.stats import bootstrap_diff

    rng = np.random.default_rng([rng_seed, seeds])
    two_level = uncorrected = scans_only = 0
    for r in range(reps):
        difficulty = rng.normal(0.0, DIFFICULTY_SD, scans)
        a, b = (difficulty + rng.normal(0.0, seed_sd, (seeds, 1)) + rng.normal(0.0, scan_sd, (seeds, scans))
                for _ in range(2))
        boot_seed = rng_seed * 1_000_003 + seeds * 100_003 + r
        two_level += bootstrap_diff(a, b, n_boot=n_boot, seed=boot_seed, resample_seeds=True).low > 0
        uncorrected += bootstrap_diff(a, b, n_boot=n_boot, seed=boot_seed, resample_seeds=True,
                                      seed_correction=False).low > 0
        scans_only += bootstrap_diff(a, b, n_boot=n_boot, seed=boot_seed).low > 0
    return {"seeds": seeds, "reps": reps,
            "false_positive_rate": round(two_level / reps, 4), "mc_interval": wilson(two_level, reps),
            "uncorrected_false_positive_rate": round(uncorrected / reps, 4),
            "uncorrected_mc_interval": wilson(uncorrected, reps),
            "scans_only_false_positive_rate": round(scans_only / reps, 4),
            "scans_only_mc_interval": wilson(scans_only, reps)}


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    measured = spreads_from_metrics(Path(args.metrics)) if Path(args.metrics).is_file() else None
    if (args.seed_sd is None or args.scan_sd is None) and measured is None:
        raise SystemExit(f"{args.metrics}: not found; pass --seed-sd and --scan-sd")
    seed_sd = args.seed_sd if args.seed_sd is not None else measured["seed_sd"]
    scan_sd = args.scan_sd if args.scan_sd is not None else measured["scan_sd"]
    print(f"seed_sd {seed_sd:.5f}, scan_sd {scan_sd:.5f}, {args.scans} scans, {args.reps} replicates, "
          f"{args.n_boot} resamples; nominal rate {NOMINAL:.1%}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for k in args.seeds:
        row = simulate(k, args.reps, args.scans, args.n_boot, seed_sd, scan_sd, args.rng_seed)
        rows.append(row)
        print(f"  {k} seeds: two-level {row['false_positive_rate']:.1%} {row['mc_interval']}, "
              f"uncorrected {row['uncorrected_false_positive_rate']:.1%} {row['uncorrected_mc_interval']}, "
              f"scans-only {row['scans_only_false_positive_rate']:.1%}", flush=True)
    seconds = time.perf_counter() - t0
    print()
    print("| seeds per method | lower end > 0 at zero difference, seeds and scans resampled, corrected "
          "[MC 95 %] | uncorrected [MC 95 %] | scans only (seeds averaged) | nominal |")
    print("|---|---|---|---|---|")
    for row in rows:
        lo, hi = row["mc_interval"]
        ulo, uhi = row["uncorrected_mc_interval"]
        print(f"| {row['seeds']} | {row['false_positive_rate']:.1%} [{lo:.1%}, {hi:.1%}] "
              f"| {row['uncorrected_false_positive_rate']:.1%} [{ulo:.1%}, {uhi:.1%}] "
              f"| {row['scans_only_false_positive_rate']:.1%} | {NOMINAL:.1%} |")
    return {
        "benchmark": "seed_bootstrap_calibration",
        "what": "share of replicates whose 95 % interval of A - B has its lower end above 0 when A and B have "
                "the same mean (ctrlora.evaluation.stats.bootstrap_diff, resample_seeds=True, with the "
                "small-seed correction); uncorrected: seed_correction=False; scans_only: the same with seeds "
                "averaged first (resample_seeds=False)",
        "nominal_rate": NOMINAL,
        "model": "score[m,k,i] = difficulty[i] + N(0, seed_sd) per (method, seed) + N(0, scan_sd) per "
                 "(method, seed, scan); both methods share the same mean",
        "setup": {"scans": args.scans, "reps": args.reps, "n_boot": args.n_boot, "level": 0.95,
                  "seed_sd": round(seed_sd, 6), "scan_sd": round(scan_sd, 6), "difficulty_sd": DIFFICULTY_SD,
                  "rng_seed": args.rng_seed,
                  "spreads_from": "arguments" if measured is None or (args.seed_sd is not None
                                                                      and args.scan_sd is not None) else "metrics"},
        "measured_spreads": measured,
        "results": rows,
        "seconds": round(seconds, 1),
        "environment": {"python": platform.python_version(), "numpy": np.__version__,
                        "threads": os.environ.get("OMP_NUM_THREADS")},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 5], help="training seeds per method")
    p.add_argument("--reps", type=int, default=500, help="simulated experiments per seed count")
    p.add_argument("--scans", type=int, default=200, help="test scans (the research graph's evaluate.max_scans)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (research.n_boot)")
    p.add_argument("--seed-sd", type=float, default=None, help="seed-to-seed spread of a method's mean "
                   "(default: from --metrics)")
    p.add_argument("--scan-sd", type=float, default=None, help="per-scan scatter (default: from --metrics)")
    p.add_argument("--metrics", default=str(DEFAULT_METRICS), help="research metrics the spreads are read from")
    p.add_argument("--rng-seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    report = run(args)
    save_json(report, args.out)
    print(f"-> {args.out}")
    return report


if __name__ == "__main__":
    main()
