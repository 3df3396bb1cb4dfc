"""Merge the JSON files of one ``benchmarks/run_gpu.sh`` run into ``<card>.json`` and a Markdown
table (for ``benchmarks/README.md``), with each figure beside the issue's goal.

    python benchmarks/gpu_report.py OUT_DIR --card "NVIDIA H100 80GB HBM3" --results benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FILES = {  # key in the merged JSON: file written by run_gpu.sh
    "adapter_vs_full": "adapter_vs_full.json",
    "adapter_vs_full_16gb": "adapter_vs_full_16gb.json",
    "memory_presets_b1": "memory_presets_b1.json",
    "memory_presets_b4": "memory_presets_b4.json",
    "sampling": "sampling_speed.json",
}


def slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown-card"


def _fmt(x, digits=3) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _one_step(row: dict) -> str:
    if "one_step_rel_diff" not in row:
        return ""
    return f" of ≤ {row['latent_abs_max']:.2f}; after 1 step ≤ {row['one_step_rel_diff']:.1e} relative"


def table(merged: dict) -> str:
    card, rows = merged["card"], []
    for key in ("adapter_vs_full", "adapter_vs_full_16gb"):
        avf = merged.get(key)
        if not avf:
            continue
        a, f, r = avf["adapter"], avf["full"], avf["ratios"]
        how = f"preset `{avf['memory_preset']}`" if avf.get("memory_preset") else avf["dtype"]
        rows.append(f"| adapter vs full ControlNet step, {avf['preset']} {avf['resolution']}² {how} batch "
                    f"{avf['batch']} rank {avf['rank']} | step {_fmt(a['step_s'])} s vs {_fmt(f['step_s'])} s = "
                    f"**{_fmt(r['step_time_adapter_over_full'])}×**; peak {_fmt(a['peak_mem_mb'], 0)} vs "
                    f"{_fmt(f['peak_mem_mb'], 0)} MB = **{_fmt(r['peak_mem_adapter_over_full'])}×** | "
                    f"≤ 0.9× time, ≤ 0.75× memory |")
    for key, goal in (("memory_presets_b1", "reference recipe: 1k steps ≤ 3 min (H100); a preset ≤ 10 GB"),
                      ("memory_presets_b4", "a preset ≤ 16 GB at batch 4")):
        mp = merged.get(key)
        if not mp:
            continue
        for name, v in mp["variants"].items():
            if "skipped" in v:
                rows.append(f"| adapter step, {mp['resolution']}² batch {mp['batch']} rank {mp['rank']}, `{name}` | "
                            f"skipped: {v['skipped']} | {goal} |")
                continue
            rows.append(f"| adapter step, {mp['resolution']}² batch {mp['batch']} rank {mp['rank']}, `{name}` | "
                        f"{_fmt(v['step_s'])} s/step (1k steps: {_fmt(v['step_s'] * 1000 / 60, 1)} min), peak "
                        f"**{_fmt(v['peak_mem_mb'] / 1024, 2)} GB** | {goal} |")
    sp = merged.get("sampling")
    if sp:
        for n, row in sp["multi_condition"].items():
            rows.append(f"| {n} condition(s), {sp['steps_multi_condition']} steps CFG {sp['guidance_scale']}, "
                        f"{sp['resolution']}² {sp['dtype']}: sequential / batched | {_fmt(row['sequential_s'])} s / "
                        f"{_fmt(row['batched_s'])} s = **{_fmt(row['sequential_over_batched'])}×** (latents differ "
                        f"by ≤ {row['max_abs_latent_diff']:.1e}{_one_step(row)}) | ≥ 1.5× at N = 3 |")
        ips = sp["images_per_s"]
        rows.append(f"| sampling, {ips['images']} images, {ips['steps']} DDIM steps, CFG, 1 condition, "
                    f"{sp['resolution']}² {sp['dtype']} | **{_fmt(ips['images_per_s'], 2)} images/s** | – |")
    head = f"Card: **{card}** ({merged.get('versions', '').strip()})\n\n| measurement | figure | goal |\n|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path, help="the benchmarks' JSON files and gpu.txt; <card>.json and table.md go here")
    p.add_argument("--card", required=True, help="the device's name (nvidia-smi), or e.g. 'cpu smoke'")
    p.add_argument("--results", type=Path, default=None, help="also write <results>/<card slug>.json here")
    args = p.parse_args(argv)
    merged = {"card": args.card, "missing": []}
    versions = args.out_dir / "gpu.txt"
    if versions.is_file():
        merged["versions"] = versions.read_text().strip().splitlines()[-1]
    for key, name in FILES.items():
        f = args.out_dir / name
        if f.is_file():
            merged[key] = json.loads(f.read_text())
        else:
            merged["missing"].append(name)
    text = json.dumps(merged, indent=1) + "\n"
    (args.out_dir / f"{slug(args.card)}.json").write_text(text)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{slug(args.card)}.json").write_text(text)
    md = table(merged)
    (args.out_dir / "table.md").write_text(md)
    print(md)
    return 1 if merged["missing"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
