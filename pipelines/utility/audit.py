"""DVC stage ``audit`` of the utility graph: are the generated photographs copies of training
photographs? (:mod:`ctrlora.downstream.memorization`.)

The generated pool (``generate``: one photograph per held-out training mask, with and without
control) against every training photograph, in two feature spaces (RMS pixel difference; the
backbone VAE's latent mean), with the test photographs' nearest-training distances as the
reference: the share of generated images closer to a training photograph than the
``utility.audit.percentile``-th percentile of test-to-train distances. For the controlled images
the scan whose mask drew them is known, so the audit also says how often the nearest training
photograph is that scan's own photograph (a model that maps a patient's mask back to the
patient's photograph leaks it).

Writes ``paths.metrics.utility_audit`` and ``<paths.reports.utility>/closest_pairs.png`` (pixel
space) and ``closest_pairs_latent.png``: the closest generated/training pairs side by side.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from pipelines.stages.common import timed_stage
from pipelines.utility import common as C

POOLS = ("controlled", "uncontrolled")


def main() -> int:
    from ctrlora.downstream import memorization as M
    from ctrlora.models.backbone import load_backbone

    p = C.params()
    a = p["audit"]
    torch.set_num_threads(max(1, int(p["workers"]) * int(p["threads"])))
    with timed_stage("utility audit"):
        train, test, pool = C.load(p, "train"), C.load(p, "test", p["test_scans"]), C.read_pool(p)
        vae = load_backbone(C.backbone_dir(p)).vae.eval()
        spaces = {"pixel": M.pixel_features,
                  "latent": lambda x: M.latent_features(vae, x)}
        report = p["paths"]["reports"]["utility"]
        out: dict[str, Any] = {"train_photos": len(train), "test_photos": len(test),
                               "generated": {k: int(len(pool[k])) for k in POOLS},
                               "percentile": float(a["percentile"])}
        for space, feats in spaces.items():
            ftrain, ftest = feats(train.photos), feats(test.photos)
            out[space] = {}
            for kind in POOLS:
                res = M.audit(feats(pool[kind]), ftrain, ftest, source=pool["source"],
                              percentile=float(a["percentile"]), n_boot=int(p["n_boot"]),
                              seed=int(p["bootstrap_seed"]))
                out[space][kind] = res.summary
                s = res.summary
                C.log(f"[utility audit] {space} {kind}: {s['generated_below']}/{s['n_generated']} generated images "
                      f"closer than the test p{a['percentile']:g} ({s['threshold']:.4f}); share "
                      f"{s['generated_share']['value']:.3f} [{s['generated_share']['low']:.3f}, "
                      f"{s['generated_share']['high']:.3f}], test {s['test_share']:.3f}")
                if kind == "controlled":
                    name = "closest_pairs.png" if space == "pixel" else f"closest_pairs_{space}.png"
                    M.closest_pairs_grid(pool[kind], train.photos, res.generated_nearest, res.generated_distance,
                                         report / name, n=int(a["grid_pairs"]), source=pool["source"],
                                         threshold=s["threshold"])
        dest = p["paths"]["metrics"]["utility_audit"]
        C.write_json(dest, out)
        C.log(f"[utility audit] -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
