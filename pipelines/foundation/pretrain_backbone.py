"""Foundation stage ``backbone`` (params: ``backbone`` but its ``preset`` / ``sd15_path``, and
``prepare.conditions``): build the tiny dental backbone and pretrain it on the foundation's
training photographs (VAE on photos + condition images, then the text-conditioned UNet), save it
in the diffusers SD layout under ``paths.foundation.backbone`` (committed), measure it on the
validation split (``paths.metrics.backbone``: VAE reconstruction, pixel Fréchet distance of
samples from noise with the real-vs-real floor beside it) and draw
``<paths.reports.backbone>/samples.png``.

It stands in for the Stable Diffusion 1.5 a real deployment downloads: the production graph's
``backbone`` stage records it (or a local SD 1.5) and never trains it.

The VAE learns the condition images of every condition ``prepare`` writes (``prepare.conditions``).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stages.common import (artefact_paths, checkpoint_dir, clear_checkpoints, read_params, timed_stage,
                                     write_curve)


PRODUCTION_KEYS = ("preset", "sd15_path")  # backbone.* read by the production graph's record stage
# backbone.* this graph reads: seed, quality (QUALITY_KEYS), and the configs' own sections
FOUNDATION_KEYS = ("seed", "quality", "tiny", "vae", "unet")
QUALITY_KEYS = ("samples", "steps", "guidance_scale")


def check_params(p: dict) -> dict:
    """params ``backbone`` with its keys checked (none missing, none unknown); the configs'
    own sections are checked by their builders."""
    from ctrlora.params import checked_section

    p = checked_section("backbone", p, (*PRODUCTION_KEYS, *FOUNDATION_KEYS))
    checked_section("backbone.quality", p["quality"], QUALITY_KEYS)
    return p


def _split_tensors(prepared: Path, conditions: list[str], split: str):
    """Photos [N, 3, H, W] in [-1, 1], captions, and each condition's images in [0, 1]."""
    from ctrlora.data.pairs import PairDataset

    first = PairDataset(prepared, conditions[0], split, preload=True)
    photos = torch.stack([first[i]["photo"] for i in range(len(first))])
    captions = [first[i]["caption"] for i in range(len(first))]
    conds = {}
    for c in conditions:
        ds = first if c == first.condition else PairDataset(prepared, c, split, preload=True)
        conds[c] = torch.stack([ds[i]["condition"] for i in range(len(ds))])
    return photos, captions, conds


def _pretrain(p: dict, photos, captions, conds, ckpt: Path):
    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.backbone import TinyBackboneConfig, build_tiny_backbone
    from ctrlora.models.latents import encode_posterior
    from ctrlora.training.pretrain import (UNetPretrainConfig, VAEPretrainConfig, pretrain_unet, pretrain_vae,
                                           set_latent_scaling)

    cfg = TinyBackboneConfig.from_params(p["tiny"])
    bb = build_tiny_backbone(cfg, CAPTION_VOCABULARY)
    vae_res = pretrain_vae(bb.vae, photos, torch.cat(list(conds.values())), VAEPretrainConfig.from_params(p["vae"]),
                           checkpoint_dir=ckpt / "vae")
    mean, logvar = encode_posterior(bb.vae, photos)
    factor = set_latent_scaling(bb.vae, mean, logvar, seed=int(p["seed"]))
    print(f"[backbone] latent scaling factor {factor:.4f}")
    unet_res = pretrain_unet(bb.unet, bb.text_encoder, bb.tokenizer, bb.scheduler, mean, logvar, factor, captions,
                             UNetPretrainConfig.from_params(p["unet"]), checkpoint_dir=ckpt / "unet")
    return bb, vae_res, unet_res


def _measure(p: dict, bb, train_photos, prepared: Path, conditions: list[str], reports: Path) -> dict:
    """Backbone quality on the validation split, and the sample grid."""
    from ctrlora.evaluation.backbone_quality import (backbone_samples, pixel_frechet_distance, text_to_image,
                                                     to_uint8, vae_reconstruction)

    q = p["quality"]
    photos, captions, conds = _split_tensors(prepared, conditions, "validation")
    n = min(int(q["samples"]), len(photos))
    t = time.perf_counter()
    gen = text_to_image(bb, captions[:n], steps=int(q["steps"]), guidance_scale=float(q["guidance_scale"]),
                        seed=int(p["seed"]))
    real, floor_set = to_uint8(photos[:n]), to_uint8(train_photos[:n])
    metrics = {"vae": vae_reconstruction(bb.vae, photos, conds),
               "samples": {"n": n, "steps": int(q["steps"]), "guidance_scale": float(q["guidance_scale"]),
                           **{f"pixfd{k}": pixel_frechet_distance(gen, real, k) for k in (8, 16)},
                           **{f"pixfd{k}_real_floor": pixel_frechet_distance(floor_set, real, k) for k in (8, 16)}},
               "split": "validation"}
    backbone_samples(bb, captions[:8], reports / "samples.png", real=photos[:8], generated=gen[:8])
    print(f"[backbone] validation: {json.dumps(metrics)} ({time.perf_counter() - t:.1f} s)")
    return metrics


def main() -> int:
    allp, paths = read_params("backbone", "prepare"), artefact_paths()
    p, conditions = check_params(allp["backbone"]), list(allp["prepare"]["conditions"])
    out, reports, prepared = paths["foundation"]["backbone"], paths["reports"]["backbone"], paths["foundation"]["prepared"]
    # the production-side settings (which backbone the graph reads) do not change what is trained here
    p = {k: v for k, v in p.items() if k not in PRODUCTION_KEYS}
    with timed_stage("foundation/backbone"):
        if out.exists():
            shutil.rmtree(out)
        ckpt = checkpoint_dir("foundation_backbone", p)
        torch.manual_seed(int(p["seed"]))
        photos, captions, conds = _split_tensors(prepared, conditions, "train")
        print(f"[backbone] {len(photos)} training photos, {sum(len(c) for c in conds.values())} condition images")
        bb, vae_res, unet_res = _pretrain(p, photos, captions, conds, ckpt)
        bb.save(out)
        clear_checkpoints(ckpt)
        write_curve(vae_res.history, reports / "vae_loss.csv", ("loss", "l1", "photo_l1", "kl"))
        write_curve(unet_res.history, reports / "unet_loss.csv")
        metrics = _measure(p, bb, photos, prepared, conditions, reports)
        target = paths["metrics"]["backbone"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"[backbone] saved {out}; samples: {reports / 'samples.png'}; metrics: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
