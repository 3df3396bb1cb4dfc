"""The README's screenshots of the studio, taken by headless Chromium on the default run's models.

    python -m pipelines.studio.shots [--out docs/images] [--chromium /usr/bin/chromium]

Needs the default run's artefacts (``make repro``: ``models/``, ``data/prepared``,
``metrics/evaluate.json``) and, for the challenger, the research graph's second training seed of
the lighting adapter (``make research``: ``models/research/seeds/adapter/*/seed_1/adapter``).
Nothing of the project's registry is touched: a temporary sqlite store gets

* ``ctrlora-segmentation`` v1 and ``ctrlora-lighting`` v1 (the production adapters, with their
  fidelity from ``metrics/evaluate.json``), and
* ``ctrlora-lighting`` v2: the research run's seed-1 adapter (same recipe, another seed), with
  its mean test fidelity from ``models/research/test_scores.json``;

then ``ctrlora-ops studio`` serves it and the browser does the reviewer's three things: inspect
an adapter, compare champion and challenger on a test scan, promote (the confirmation dialog).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipelines.settings import PATHS, REPO_ROOT

SHOTS = ("inspect", "compare", "promote")


def _register(root: Path) -> None:
    """The three versions into the store of ``MLFLOW_TRACKING_URI``."""
    import numpy as np

    from pipelines.registry.dvclock import dataset_hash_from_lock
    from pipelines.registry.registration import register_adapter

    evaluate = json.loads((root / PATHS["metrics"]["evaluate"]).read_text())
    research = json.loads((root / PATHS["research"] / "test_scores.json").read_text())
    seed1 = sorted((root / PATHS["research"] / "seeds" / "adapter").glob("lr_*/seed_1/adapter"))
    if not seed1:
        raise FileNotFoundError("no research seed-1 lighting adapter (run `make research` first)")
    ad = research["methods"]["adapter"]
    challenger_fid = float(np.mean(ad["scores"][ad["seeds"].index(1)]))
    versions = [("segmentation", root / PATHS["base"] / "adapters" / "segmentation",
                 evaluate["segmentation"]["fidelity"]),
                ("lighting", root / PATHS["adapters"] / "lighting", evaluate["lighting"]["fidelity"]),
                ("lighting", seed1[0], challenger_fid)]
    for cond, adapter, fid in versions:
        res = register_adapter(cond, adapter, dataset_hash=dataset_hash_from_lock(root, cond),
                               base_hash="default-run", backbone_dir=root / PATHS["backbone"],
                               base_dir=root / PATHS["base"], metrics={"fidelity": fid},
                               git_commit="studio-screenshots",
                               gate={"metric": "fidelity", "mode": "max", "min_delta": 0})
        print(f"registered {res.model_name} v{res.version}: {res.decision}", flush=True)


def _drive(url: str, chromium: str, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            expect.set_options(timeout=300_000)
            page.set_default_timeout(300_000)
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            page.locator("tr[data-ref='models:/ctrlora-lighting/2'] button.inspect").click()
            page.locator("#models-section").screenshot(path=str(out / "studio_inspect.png"))

            page.check("#use-segmentation")
            page.check("#use-lighting")
            page.select_option("#scan", page.locator("#scan option").nth(1).get_attribute("value"))
            page.fill("#steps", "20")
            page.fill("#num-images", "4")
            page.select_option("#compare-condition", "lighting")
            page.select_option("#compare-a", "models:/ctrlora-lighting/1")
            page.select_option("#compare-b", "models:/ctrlora-lighting/2")
            page.click("#compare")
            expect(page.locator("#runs img.generated")).to_have_count(8)
            page.locator("#inspect").evaluate("e => e.style.display = 'none'")
            page.screenshot(path=str(out / "studio_compare.png"), full_page=True)
            page.locator("#runs .run").nth(1).locator("button.promote").click()
            expect(page.locator("#confirm")).to_be_visible()
            page.locator("#confirm").screenshot(path=str(out / "studio_promote.png"))
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.studio.shots", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "images")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        print("studio_shots: no chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ctrlora-studio-shots-"))
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
                      MLFLOW_EXPERIMENT_NAME="studio-screenshots", CTRLORA_PARTS_CACHE=str(tmp / "parts"))
    proc = None
    try:
        _register(REPO_ROOT)
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "studio", "--port", "0", "--threads", "1"],
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if "serving on " not in line:
            print(f"studio_shots: the studio did not start: {line!r}", file=sys.stderr)
            return 1
        _drive(line.split("serving on ", 1)[1].strip(), args.chromium, args.out)
        for name in SHOTS:
            print(args.out / f"studio_{name}.png")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
