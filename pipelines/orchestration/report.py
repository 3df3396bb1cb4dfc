"""The README's result tables, written from the committed metrics files (never typed by hand).

``python -m pipelines.orchestration.report`` (``make report``; ``make repro`` runs it last) renders
``foundation/metrics/backbone.json``, ``metrics/evaluate.json``, ``metrics/research.json`` (when the research
graph has run) and ``reports/repro_times.json`` into the block of ``README.md`` between the
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers. ``--check`` changes nothing and
exits 1 when the README's block differs from what the files say (the test suite runs it), so a
figure in the README always comes from a file in the repository.

The pictures the README shows (the backbone's samples, the control grids) are DVC outputs, which
git does not hold; the report copies them to ``docs/images/`` (committed) so a reader of the
repository sees the grids of the run the tables come from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipelines.settings import PATHS, REPO_ROOT, REPRO_TIMES

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
FILES = {"backbone": PATHS["metrics"]["backbone"], "evaluate": PATHS["metrics"]["evaluate"],
         "research": PATHS["metrics"]["research"], "sweep": PATHS["metrics"]["research_selection"],
         "times": REPRO_TIMES, "retrain_times": PATHS["retrain_times"],
         "utility": PATHS["metrics"]["utility"], "utility_selection": PATHS["metrics"]["utility_selection"],
         "audit": PATHS["metrics"]["utility_audit"], "efficiency": PATHS["metrics"]["efficiency"],
         # how often the research rule passes a true zero difference (benchmarks/seed_bootstrap_calibration.py)
         "calibration": "benchmarks/results/seed_bootstrap_calibration.json"}


# DVC output picture -> committed copy shown in the README
FIGURES = {
    f"{PATHS['reports']['backbone']}/samples.png": "docs/images/backbone_samples.png",
    f"{PATHS['reports']['evaluate']}/segmentation.png": "docs/images/control_segmentation.png",
    f"{PATHS['reports']['evaluate']}/lighting.png": "docs/images/control_lighting.png",
    f"{PATHS['reports']['evaluate']}/combined.png": "docs/images/control_combined.png",
    f"{PATHS['reports']['research']}/samples.png": "docs/images/research_samples.png",
    f"{PATHS['reports']['efficiency']}/curve.png": "docs/images/efficiency_curve.png",
    f"{PATHS['reports']['utility']}/curve.png": "docs/images/utility_curve.png",
    f"{PATHS['reports']['utility']}/predictions.png": "docs/images/utility_predictions.png",
    f"{PATHS['reports']['utility']}/generated.png": "docs/images/utility_generated.png",
    f"{PATHS['reports']['utility']}/closest_pairs.png": "docs/images/utility_closest_pairs.png",
}


def copy_figures(root: Path = REPO_ROOT, check: bool = False) -> list[str]:
    """Copy the README's pictures out of the DVC outputs; returns the copies that changed (or
    would). A picture whose output is absent (a fresh clone before ``make repro``) is left as is."""
    changed = []
    for src, dst in FIGURES.items():
        s, d = root / src, root / dst
        if not s.is_file():
            continue
        data = s.read_bytes()
        if d.is_file() and d.read_bytes() == data:
            continue
        changed.append(dst)
        if not check:
            d.parent.mkdir(parents=True, exist_ok=True)
            d.write_bytes(data)
    return changed


def _load(root: Path) -> dict[str, Any]:
    out = {}
    for key, rel in FILES.items():
        path = root / rel
        out[key] = json.loads(path.read_text()) if path.is_file() else None
    return out


def _f(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _iv(iv: dict | None, digits: int = 3, signed: bool = True) -> str:
    if not iv:
        return "–"
    return f"{_f(iv.get('value'), digits, signed)} [{_f(iv.get('low'), digits, signed)}, {_f(iv.get('high'), digits, signed)}]"


def _ok(check: dict | None) -> str:
    return "–" if check is None else ("**pass**" if check.get("pass") else "fail")


def backbone_table(m: dict) -> list[str]:
    vae, s = m["vae"], m["samples"]
    conds = [k[:-5] for k in vae if k.endswith("_psnr") and k != "photo_psnr"]
    return [
        f"Backbone alone (the foundation's, `make foundation`), on the {m.get('split', 'validation')} split "
        f"(`{FILES['backbone']}`):",
        "",
        "| VAE reconstruction | photo PSNR dB / SSIM | condition PSNR dB |",
        "|---|---|---|",
        f"| posterior mean | {_f(vae['photo_psnr'], 2)} / {_f(vae['photo_ssim'])} | "
        + ", ".join(f"{c} {_f(vae[c + '_psnr'], 1)}" for c in conds) + " |",
        "",
        f"| samples from noise ({s['n']}, DDIM {s['steps']}, guidance {s['guidance_scale']}) | pixel FD 8×8 | pixel FD 16×16 |",
        "|---|---|---|",
        f"| generated vs real validation photos | {_f(s['pixfd8'], 2)} | {_f(s['pixfd16'], 2)} |",
        f"| floor: real training vs real validation photos | {_f(s['pixfd8_real_floor'], 2)} | {_f(s['pixfd16_real_floor'], 2)} |",
        "",
    ]


def _bar(check: dict | None, op: str = "≥") -> str:
    """The check's bar as the metrics file records it (thresholds live in quality_bar.py)."""
    return "–" if check is None or check.get("threshold") is None else f"{op} {check['threshold']}"


def _condition_rows(conds: dict, order, checks: dict, label: str = "95 % interval") -> list[str]:
    lines = [f"| condition | metric | uncontrolled | controlled | gain [{label}] | bar | |",
             "|---|---|---|---|---|---|---|"]
    for c in order:
        m = conds.get(c, {})
        chk = checks.get(f"controlled_vs_uncontrolled/{c}")
        lines.append(f"| {c} | {m.get('metric', '')} | {_f(m.get('uncontrolled'))} | {_f(m.get('fidelity'))} | "
                     f"{_iv(m.get('gain'))} | {_bar(chk)} | {_ok(chk)} |")
    return lines


def _combined_rows(comb: dict | None, checks: dict, label: str = "95 %") -> list[str]:
    if not comb:
        return []
    w = " + ".join(f"{c} × {v:g}" for c, v in comb["weights"].items())
    lines = ["", f"Combined ({w}): the share of each single condition's gain kept", "",
             f"| condition | single gain | combined gain | combined ÷ single [{label}] | bar | |", "|---|---|---|---|---|---|"]
    for c in comb["weights"]:
        chk = checks.get(f"combined_vs_single/{c}")
        lines.append(f"| {c} | {_f(comb[c].get('single_gain'), signed=True)} | {_iv(comb[c].get('gain'))} | "
                     f"{_iv(comb[c].get('ratio'), signed=False)} | {_bar(chk)} | {_ok(chk)} |")
    return lines


def _size_rows(checks: dict) -> list[str]:
    sizes = [(k.split("/", 1)[1], v) for k, v in checks.items() if k.startswith("adapter_param_fraction/")]
    if not sizes:
        return []
    return ["", "| adapter size ÷ ControlNet | " + " | ".join(c for c, _ in sizes) + " |",
            "|---|" + "---|" * len(sizes),
            f"| {_bar(sizes[0][1], '≤')} | " + " | ".join(f"{_f(v['value'])} {_ok(v)}" for _, v in sizes) + " |"]


def control_table(ev: dict) -> list[str]:
    qb = ev["quality_bar"]
    checks = qb["checks"]
    proto = ev.get("protocol", {})
    lines = [
        f"Control on the test split ({proto.get('n_scans', '?')} scans, guidance {qb.get('guidance')} — the gating "
        "setting, `evaluate.gate_guidance`; paired bootstrap 95 % intervals over scans, "
        f"{proto.get('train_seeds', 1)} training seed; a check passes only when the interval's lower end clears "
        "the bar; `metrics/evaluate.json`):",
        "",
    ]
    lines += _condition_rows(ev, proto.get("conditions", []), checks)
    lines += _combined_rows(ev.get("combined"), checks)
    lines += _size_rows(checks)
    lines += ["", f"Quality bar: **{qb['passed']} of {qb['total']} checks pass**.", ""]
    return lines


def _estimate_clears(name: str, check: dict) -> bool | None:
    """Whether a check's point estimate (not its interval) is on the passing side of its bar."""
    v, thr = check.get("value"), check.get("threshold")
    if v is None or thr is None:
        return None
    return v <= thr if name.startswith("adapter_param_fraction/") else v >= thr


def _failures(checks: dict) -> str:
    """The failing checks split by why: the estimate itself misses the bar, or only the interval's
    lower end does (undecided at this many scans)."""
    failing = [k for k, c in checks.items() if not c.get("pass")]
    if not failing:
        return ""
    width = [k for k in failing if _estimate_clears(k, checks[k])]
    short = [k for k in failing if k not in width]
    parts = []
    if short:
        parts.append(f"{len(short)} with the estimate itself short of the bar ({', '.join(f'`{k}`' for k in short)})")
    if width:
        parts.append(f"{len(width)} with the estimate past the bar but the interval's lower end not "
                     f"({', '.join(f'`{k}`' for k in width)}: undecided at this scan count)")
    return " Of the failing checks: " + "; ".join(parts) + "."


def other_guidance_table(ev: dict) -> list[str]:
    """Each non-gating guidance scale with the same checks and bars as the gating table (both from
    the metrics file), read on its own intervals — over fewer scans, so wider — with its count of
    passing checks and, for those that fail, whether the estimate or only the interval misses."""
    lines = []
    gate = ev.get("quality_bar", {})
    n_gate = ev.get("protocol", {}).get("n_scans", "?")
    for g, block in (ev.get("at_guidance") or {}).items():
        qb = block.get("quality_bar") or {}
        checks = qb.get("checks") or {}
        n = block.get("n_scans")
        label = f"95 %, {n} scans"
        lines += [f"At guidance {g} (the reference's setting; reported, not gating): the same checks and bars as "
                  f"above, read on intervals over the **first {n} test scans only** (the gating table: {n_gate}), "
                  "so every interval here is wider:", ""]
        lines += _condition_rows(block.get("conditions", {}), list(block.get("conditions", {})), checks, label)
        lines += _combined_rows(block.get("combined"), checks, label)
        lines += _size_rows(checks)
        if qb:
            lines += ["", f"At guidance {g}: **{qb.get('passed')} of {qb.get('total')} checks pass** over {n} scans "
                      f"(at the gating guidance {gate.get('guidance')}: {gate.get('passed')} of {gate.get('total')} "
                      f"over {n_gate}).{_failures(checks)}"]
        lines.append("")
    return lines


def calibration_note(calib: dict | None, seeds: int) -> str:
    """What the seed-bootstrap simulation measured for ``seeds`` training seeds a method: the share of
    true zero differences whose interval's lower end clears 0, against the nominal one-sided rate,
    and what a pass is therefore worth. The rate is the small-seed corrected interval's (the one the
    research graph reports), with the plain two-level bootstrap's rate beside it as the before; a
    results file without ``uncorrected_false_positive_rate`` predates the correction, and its rate
    is named as the plain bootstrap's."""
    row = next((r for r in (calib or {}).get("results", []) if r.get("seeds") == seeds), None)
    if row is None:
        return (f"how often this rule passes a true zero difference with {seeds} seeds a method is not measured "
                "(`benchmarks/seed_bootstrap_calibration.py`)")
    lo, hi = row["mc_interval"]
    nominal = calib["nominal_rate"]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    corrected = "uncorrected_false_positive_rate" in row
    # the Monte Carlo interval against the nominal rate decides what a pass may claim
    if lo > nominal:
        verdict = (f"above the nominal {pct(nominal)}", "so a pass is evidence across seeds, not proof at the "
                   "nominal level")
    elif hi < nominal:
        verdict = (f"below the nominal {pct(nominal)}", "so the rule is conservative: a pass is at least a "
                   "nominal-level claim about the recipe")
    else:
        verdict = (f"consistent with the nominal {pct(nominal)}", "so a pass is a claim about the recipe at about "
                   "the nominal level")
    if corrected:
        ulo, uhi = row.get("uncorrected_mc_interval", [float("nan"), float("nan")])
        source = (f"small-seed corrected interval; without the correction it was "
                  f"{pct(row['uncorrected_false_positive_rate'])} [{pct(ulo)}, {pct(uhi)}]")
    else:
        source = "plain two-level bootstrap, measured before the small-seed correction"
    return (f"with {seeds} seeds a method, a true zero difference clears \"lower end > 0\" "
            f"{pct(row['false_positive_rate'])} of the time [{pct(lo)}, {pct(hi)}], {verdict[0]} ({source}; "
            "simulation at the measured seed spread, `benchmarks/results/seed_bootstrap_calibration.json`), "
            f"{verdict[1]}")


def research_table(rs: dict, sweep: dict | None, calib: dict | None = None) -> list[str]:
    qb = rs["quality_bar"]
    seeds = min((len(v.get("seeds", [])) for v in rs["methods"].values()), default=0)
    lines = [f"Research graph (`make research`, `metrics/research.json`): new condition on {rs['n_scans']} test "
             "scans; each method at the learning rate it scored best with on validation; paired bootstrap "
             "95 % intervals that resample the training seeds as well as the scans; "
             f"{calibration_note(calib, seeds)}. The check table gives the scans-only interval (seeds averaged: "
             "about these trained models, not the recipe) beside it.", "",
             "| method | learning rate | seeds | fidelity per seed | trainable params | fidelity | "
             "gain over uncontrolled [95 %] |",
             "|---|---|---|---|---|---|---|"]
    for m, v in rs["methods"].items():
        per_seed = " / ".join(_f(x) for x in v.get("fidelity_per_seed", []))
        lines.append(f"| {m} | {v.get('learning_rate')} | {len(v.get('seeds', []))} | {per_seed} | "
                     f"{v.get('trainable_params'):,} | {_iv(v.get('fidelity'), signed=False)} | {_iv(v.get('gain'))} |")
    lines += ["", "| check | value [95 %, seeds and scans] | scans only | bar | |", "|---|---|---|---|---|"]
    for name, c in qb["checks"].items():
        iv = {"value": c.get("value"), "low": c.get("low"), "high": c.get("high")}
        shown = _iv(iv, signed=False) if c.get("low") is not None or c.get("high") is not None else _f(c.get("value"))
        so = c.get("scans_only")
        scans_only = f"[{_f(so.get('low'))}, {_f(so.get('high'))}]" if so else "–"
        op = "≤" if name.endswith("param_fraction") else ("> " if c.get("threshold") == 0 else "≥ ")
        lines.append(f"| {name} | {shown} | {scans_only} | {op.strip()} {c.get('threshold')} | {_ok(c)} |")
    for key, title in (("embedding_ablation", "Embedding ablation"),
                       ("base_convergence", "Trained base vs UNet copy, the adapter against steps")):
        ab = rs.get(key)
        if not ab:
            continue
        pair = [m for m in ab if isinstance(ab[m], dict) and "steps_to_90pct_per_seed" in ab[m]]
        lines += ["", f"{title} ({ab['n_scans']} scans, snapshots at {', '.join(map(str, ab['steps']))} steps): "
                  "steps to 90 % of the final gain per seed — "
                  + "; ".join(f"{m}: {ab[m]['steps_to_90pct_per_seed']}" for m in pair)
                  + f"; converges earlier: **{ab['converges_earlier']}**.", "",
                  "| step | " + " | ".join(pair) + f" | {pair[0]} − {pair[1]} [95 %, seeds and scans] |",
                  "|---|" + "---|" * (len(pair) + 1)]
        for st in ab["steps"]:
            lines.append(f"| {st} | " + " | ".join(_f(ab[m]["fidelity"][str(st)]["value"]) for m in pair)
                         + f" | {_iv(ab['difference'][str(st)])} |")
    lines.append("")
    return lines


UTILITY_ARMS = {"real": "real only", "real_aug": "real + classic augmentation",
                "real_gen": "real + generated (with control)", "real_gen_uncontrolled": "real + generated (without control)",
                "real_aug_gen": "real + augmentation + generated"}


def _worth(w: dict | None) -> str:
    """"+N [low, high]" real photographs; an end beyond (below) the real-only curve says so."""
    if not w:
        return "–"
    words = {"above_curve": "beyond the curve", "below_curve": "below the curve"}

    def end(v: Any) -> str:
        return words.get(v, "–") if isinstance(v, str) or v is None else f"{v:+.0f}"
    point = words["above_curve"] if w.get("above") else words["below_curve"] if w.get("below") else f"{w['worth']:+.0f}"
    return f"{point} [{end(w.get('low'))}, {end(w.get('high'))}]"


def utility_table(u: dict, sel: dict | None, audit: dict | None) -> list[str]:
    """The downstream-utility figures: test mIoU of the user's segmenter per N and arm, gains over
    real only, the headline at N and the memorization audit."""
    h = u["headline"]
    n0 = str(h["n"])
    lines = [f"Utility graph (`make utility`, `metrics/utility.json`): a tooth segmenter (MONAI U-Net from scratch) "
             f"trained on N real annotated photographs, tested on the real test split ({u['test_scans']} scans); "
             f"{u['seeds']} training seeds (each draws its own N photographs); paired bootstrap intervals over test "
             f"scans and seeds; M generated images chosen on validation per N and arm "
             f"(`metrics/utility_selection.json`). Test mIoU:", ""]
    arms = [a for a in UTILITY_ARMS if any(a in row for row in u["n"].values())]
    ns = sorted(u["n"], key=int)
    lines += ["| N | " + " | ".join(UTILITY_ARMS[a] for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for n in ns:
        cells = []
        for a in arms:
            r = u["n"][n].get(a)
            if r is None:
                cells.append("")
                continue
            c = _f(r["miou"]["value"])
            if "gain" in r:
                c += f" ({_f(r['gain']['value'], signed=True)} [{_f(r['gain']['low'], signed=True)}, "
                c += f"{_f(r['gain']['high'], signed=True)}])"
            if r.get("m"):
                c += f", M = {r['m']}"
            cells.append(c)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "(gain over real only at the same N in brackets, 95 % interval; "
              f"the curve as a whole: the family-wise intervals at level {u['family_level']:.4f} in the metrics file)", ""]
    if "gain" in h:
        checks = h.get("checks", {})
        lines += [f"At N = {n0}: generated images (with control) add **{_iv(h['gain'])}** mIoU over real only"
                  + (f", {_iv(h['vs_real_gen_uncontrolled'])} over the same amount of images generated without "
                     "control" if "vs_real_gen_uncontrolled" in h else "")
                  + (f", {_iv(h['vs_real_aug'])} over classic augmentation" if "vs_real_aug" in h else "")
                  + f"; worth {_worth(h.get('worth'))} real photographs"
                  + (f"; with augmentation on both sides, generating adds {_iv(h['augmented_vs_real_aug'])}"
                     if "augmented_vs_real_aug" in h else "") + ". Bar (lower ends above 0): gain "
                  + ("**pass**" if checks.get("gain_above_zero") else "fail") + ", above the uncontrolled control "
                  + ("**pass**" if checks.get("above_uncontrolled_control") else "fail") + ".", ""]
    if audit:
        rows = []
        for space in ("pixel", "latent"):
            for kind in ("controlled", "uncontrolled"):
                s = audit.get(space, {}).get(kind)
                if not s:
                    continue
                src = s.get("source", {}).get("nearest_is_source", {})
                rows.append(f"| {space} | {kind} | {s['generated_below']} of {s['n_generated']} | "
                            f"{_f(s['generated_share']['value'])} [{_f(s['generated_share']['low'])}, "
                            f"{_f(s['generated_share']['high'])}] | {_f(s['test_share'])} | "
                            f"{_f(s['median_ratio'], 2)} | {_f(src.get('value'))} |")
        lines += [f"Memorization audit (`metrics/utility_audit.json`): each generated image's nearest training "
                  f"photograph ({audit['train_photos']}) against the test photographs' nearest-training distances; "
                  f"share closer than the {audit['percentile']:g} % quantile of the test's:", "",
                  "| space | generated | below | share [95 %] | test's own share | median distance ÷ test's | "
                  "nearest is its own mask's scan |", "|---|---|---|---|---|---|---|", *rows, ""]
    return lines


def efficiency_table(e: dict) -> list[str]:
    """Where the trained base pays off: new-condition gains at K pairs per method, the base's
    difference over the UNet copy with per-point and family-wise intervals, the headline checks."""
    lines = [f"Data-efficiency graph (`make efficiency`, `metrics/efficiency.json`): a new condition learnt from K "
             "pairs, the same steps for every K and method, rates tuned on validation; gain over no control on "
             "the test scans, paired bootstrap over scans and training seeds (95 %); the base's difference over "
             f"the UNet copy also with the family-wise interval over the curve's K (level {e['family_level']:.4f}):",
             ""]
    for c, ce in e["conditions"].items():
        ks = sorted(ce["k"], key=int)
        methods = list(next(iter(ce["k"].values()))["methods"])
        lines += [f"| {c}: K | " + " | ".join(f"{m} gain" for m in methods)
                  + " | adapter − adapter_unet_copy [95 %] | family-wise |", "|---" * (len(methods) + 3) + "|"]
        for k in ks:
            row = ce["k"][k]
            d = row["differences"].get("adapter - adapter_unet_copy", {})
            fam = d.get("family", {})
            lines.append(f"| {k} | " + " | ".join(_iv(row["methods"][m]["gain"]) for m in methods)
                         + f" | {_iv(d) if d else '–'} | "
                         + (f"[{_f(fam.get('low'), signed=True)}, {_f(fam.get('high'), signed=True)}]" if fam else "–")
                         + " |")
        lines.append("")
    h = e.get("headline", {})
    if h.get("checks"):
        done = ", ".join(f"{name} {'**pass**' if c['pass'] else 'fail'}" for name, c in h["checks"].items())
        lines += [f"Trained base over UNet copy, family-wise lower end > 0: {h['passed']} of {h['total']} ({done}).", ""]
    return lines


def times_table(t: dict) -> list[str]:
    rows = t.get("stages", [])
    lines = [f"Wall time of the run these figures come from (`reports/repro_times.json`, {t.get('machine', '')}):", "",
             "| stage | s |", "|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.0f} |" for r in rows]
    lines += [f"| **pipeline total** (`make repro` after set-up) | **{t['total_seconds']:.0f}** |", ""]
    return lines


def retrain_table(t: dict) -> list[str]:
    rows = t.get("stages", [])
    lines = [f"Wall time of a retrain after {t.get('landed', '?')} scans landed (`python -m pipelines.orchestration.flows "
             f"retrain`; `{PATHS['retrain_times']}`, {t.get('machine', '')}):", "",
             "| part | s |", "|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.0f} |" for r in rows]
    lines += [f"| **retrain total** (landing to registered versions) | **{t['total_seconds']:.0f}** |", ""]
    return lines


def render(root: Path = REPO_ROOT) -> str:
    d = _load(root)
    lines = [BEGIN, "<!-- written by `python -m pipelines.orchestration.report` from the files named below; do not edit -->", ""]
    if d["backbone"]:
        lines += backbone_table(d["backbone"])
    if d["evaluate"]:
        lines += control_table(d["evaluate"]) + other_guidance_table(d["evaluate"])
    if d["research"]:
        lines += research_table(d["research"], d["sweep"], d["calibration"])
    if d["utility"]:
        lines += utility_table(d["utility"], d["utility_selection"], d["audit"])
    if d["efficiency"]:
        lines += efficiency_table(d["efficiency"])
    if d["times"]:
        lines += times_table(d["times"])
    if d["retrain_times"]:
        lines += retrain_table(d["retrain_times"])
    if len(lines) == 3:
        lines += ["(no metrics yet: run `make repro`)", ""]
    return "\n".join(lines + [END])


def update_readme(root: Path = REPO_ROOT, check: bool = False) -> bool:
    """Rewrite the README's generated block; returns whether it changed (or would change)."""
    readme = root / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + render(root) + tail
    if new != text and not check:
        readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the README's result tables from the metrics files.")
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date; change nothing")
    args = ap.parse_args(argv)
    changed = update_readme(check=args.check)
    figures = copy_figures(check=args.check)
    for f in figures:
        print(f"figure {'out of date' if args.check else 'updated'}: {f}")
    changed = changed or bool(figures)
    if args.check and changed:
        print("README.md results are out of date: run `python -m pipelines.orchestration.report`", file=sys.stderr)
        return 1
    print("README.md results " + ("updated" if changed else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
