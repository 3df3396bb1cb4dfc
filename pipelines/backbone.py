"""DVC stage ``backbone`` (params: ``backbone``).

* ``preset: tiny`` — build the tiny dental backbone and pretrain it on the training photographs
  (VAE on photos + condition images, then the text-conditioned UNet), save it in the diffusers
  SD layout under ``models/backbone`` and write a grid of samples drawn from noise.
* ``preset: sd15`` — only check the local SD 1.5 directory named by ``sd15_path`` and record it
  (path + content hash) in ``models/backbone/backbone.json``; later stages load it from there.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stage import checkpoint_dir, clear_checkpoints, read_params, timed_stage, write_curve

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.data.pairs import PairDataset
    from ctrlora.models.backbone import TinyBackboneConfig, backbone_hash, build_tiny_backbone, load_backbone
    from ctrlora.training.backbone import (UNetPretrainConfig, VAEPretrainConfig, encode_posterior,
                                           pretrain_unet, pretrain_vae, set_latent_scaling)
    from ctrlora.training.loop import TrainConfig
    from ctrlora.training.sampling import backbone_samples

    p = read_params("backbone")
    out = ROOT / p["out"]
    reports = ROOT / p["reports"]
    with timed_stage("backbone"):
        if out.exists():
            shutil.rmtree(out)
        if p["preset"] == "sd15":
            src = Path(p["sd15_path"]).expanduser().resolve()
            load_backbone(src)  # raises, listing what is missing
            out.mkdir(parents=True)
            (out / "backbone.json").write_text(json.dumps({"preset": "sd15", "path": str(src),
                                                           "hash": backbone_hash(src)}, indent=1))
            return 0
        if p["preset"] != "tiny":
            raise ValueError(f"params.yaml backbone.preset must be 'tiny' or 'sd15', got {p['preset']!r}")
        ckpt = checkpoint_dir("backbone", p)
        torch.manual_seed(int(p["seed"]))
        prepared = ROOT / p["prepared"]
        photo_ds = PairDataset(prepared, p["vae_conditions"][0], "train", preload=True)
        photos = torch.stack([photo_ds[i]["photo"] for i in range(len(photo_ds))])
        captions = [photo_ds[i]["caption"] for i in range(len(photo_ds))]
        conds = []
        for c in p["vae_conditions"]:
            ds = photo_ds if c == photo_ds.condition else PairDataset(prepared, c, "train", preload=True)
            conds.append(torch.stack([ds[i]["condition"] for i in range(len(ds))]))
        conds = torch.cat(conds)
        print(f"[backbone] {len(photos)} training photos, {len(conds)} condition images")

        cfg = TinyBackboneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["tiny"].items()})
        bb = build_tiny_backbone(cfg, CAPTION_VOCABULARY)
        vae_res = pretrain_vae(bb.vae, photos, conds, VAEPretrainConfig(
            TrainConfig.from_dict(p["vae"]["train"]), kl_weight=float(p["vae"]["kl_weight"]),
            photo_fraction=float(p["vae"]["photo_fraction"])), checkpoint_dir=ckpt / "vae")
        mean, logvar = encode_posterior(bb.vae, photos)
        factor = set_latent_scaling(bb.vae, mean, logvar, seed=int(p["seed"]))
        print(f"[backbone] latent scaling factor {factor:.4f}")
        unet_res = pretrain_unet(bb.unet, bb.text_encoder, bb.tokenizer, bb.scheduler, mean, logvar, factor, captions,
                                 UNetPretrainConfig(TrainConfig.from_dict(p["unet"]["train"]),
                                                    prompt_dropout=float(p["unet"]["prompt_dropout"]),
                                                    min_snr_gamma=float(p["unet"]["min_snr_gamma"])),
                                 checkpoint_dir=ckpt / "unet")
        bb.save(out)
        clear_checkpoints(ckpt)
        write_curve(vae_res.history, reports / "vae_loss.csv", ("loss", "l1", "photo_l1", "kl"))
        write_curve(unet_res.history, reports / "unet_loss.csv")
        backbone_samples(bb, captions[:8], reports / "samples.png", real=photos[:8], seed=int(p["seed"]))
        print(f"[backbone] saved {out}; samples: {reports / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
