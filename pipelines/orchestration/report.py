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
         "times": REPRO_TIMES}


# DVC output picture -> committed copy shown in the README
FIGURES = {
    f"{PATHS['reports']['backbone']}/samples.png": "docs/images/backbone_samples.png",
    f"{PATHS['reports']['evaluate']}/segmentation.png": "docs/images/control_segmentation.png",
    f"{PATHS['reports']['evaluate']}/lighting.png": "docs/images/control_lighting.png",
    f"{PATHS['reports']['evaluate']}/combined.png": "docs/images/control_combined.png",
    f"{PATHS['reports']['research']}/samples.png": "docs/images/research_samples.png",
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


def control_table(ev: dict) -> list[str]:
    qb = ev["quality_bar"]
    checks = qb["checks"]
    proto = ev.get("protocol", {})
    lines = [
        f"Control on the test split ({proto.get('n_scans', '?')} scans, guidance {qb.get('guidance')} — the gating "
        f"setting; paired bootstrap 95 % intervals over scans, {proto.get('train_seeds', 1)} training seed; "
        "a check passes only when the interval's lower end clears the bar; `metrics/evaluate.json`):",
        "",
        "| condition | metric | uncontrolled | controlled | gain [95 % interval] | bar | |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in proto.get("conditions", []):
        m = ev.get(c, {})
        chk = checks.get(f"controlled_vs_uncontrolled/{c}")
        lines.append(f"| {c} | {m.get('metric', '')} | {_f(m.get('uncontrolled'))} | {_f(m.get('fidelity'))} | "
                     f"{_iv(m.get('gain'))} | ≥ {chk['threshold'] if chk else '–'} | {_ok(chk)} |")
    comb = ev.get("combined")
    if comb:
        w = " + ".join(f"{c} × {v:g}" for c, v in comb["weights"].items())
        lines += ["", f"Combined ({w}): the share of each single condition's gain kept", "",
                  "| condition | single gain | combined gain | combined ÷ single [95 %] | bar | |", "|---|---|---|---|---|---|"]
        for c in comb["weights"]:
            chk = checks.get(f"combined_vs_single/{c}")
            lines.append(f"| {c} | {_f(comb[c].get('single_gain'), signed=True)} | {_iv(comb[c].get('gain'))} | "
                         f"{_iv(comb[c].get('ratio'), signed=False)} | ≥ {chk['threshold'] if chk else '–'} | {_ok(chk)} |")
    sizes = [(k.split("/", 1)[1], v) for k, v in checks.items() if k.startswith("adapter_param_fraction/")]
    if sizes:
        lines += ["", "| adapter size ÷ ControlNet | " + " | ".join(c for c, _ in sizes) + " |",
                  "|---|" + "---|" * len(sizes),
                  "| ≤ 0.15 | " + " | ".join(f"{_f(v['value'])} {_ok(v)}" for _, v in sizes) + " |"]
    lines += ["", f"Quality bar: **{qb['passed']} of {qb['total']} checks pass**.", ""]
    return lines


def other_guidance_table(ev: dict) -> list[str]:
    lines = []
    for g, block in (ev.get("at_guidance") or {}).items():
        conds = block.get("conditions", {})
        lines += [f"At guidance {g} (the reference's setting; reported, not gating; first {block.get('n_scans')} scans):", "",
                  "| condition | uncontrolled | controlled | gain [95 %] |", "|---|---|---|---|"]
        lines += [f"| {c} | {_f(m.get('uncontrolled'))} | {_f(m.get('fidelity'))} | {_iv(m.get('gain'))} |"
                  for c, m in conds.items()]
        lines.append("")
    return lines


def research_table(rs: dict, sweep: dict | None) -> list[str]:
    qb = rs["quality_bar"]
    lines = [f"Research graph (`make research`, `metrics/research.json`): new condition on {rs['n_scans']} test "
             "scans; each method at the learning rate it scored best with on validation; paired bootstrap "
             "95 % intervals that resample the training seeds as well as the scans (a claim must hold across "
             "seeds); the check table gives the scans-only interval (seeds averaged) beside it.", "",
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


def times_table(t: dict) -> list[str]:
    rows = t.get("stages", [])
    lines = [f"Wall time of the run these figures come from (`reports/repro_times.json`, {t.get('machine', '')}):", "",
             "| stage | s |", "|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.0f} |" for r in rows]
    lines += [f"| **pipeline total** (`make repro` after set-up) | **{t['total_seconds']:.0f}** |", ""]
    return lines


def render(root: Path = REPO_ROOT) -> str:
    d = _load(root)
    lines = [BEGIN, "<!-- written by `python -m pipelines.orchestration.report` from the files named below; do not edit -->", ""]
    if d["backbone"]:
        lines += backbone_table(d["backbone"])
    if d["evaluate"]:
        lines += control_table(d["evaluate"]) + other_guidance_table(d["evaluate"])
    if d["research"]:
        lines += research_table(d["research"], d["sweep"])
    if d["times"]:
        lines += times_table(d["times"])
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
