"""What the pretrained backbone alone is worth, before any control: how sharp its VAE is and how
close its samples from noise are to real photographs — the ceiling of every controlled image.

* :func:`text_to_image` / :func:`backbone_samples` — plain text-to-image with diffusers' Stable
  Diffusion pipeline over the backbone's parts, and a grid (generated | a real photo with the same
  caption) a person can look at.
* :func:`vae_reconstruction` — PSNR / SSIM of held-out photographs through the VAE (posterior
  mean), and PSNR of condition images (the VAE also embeds every condition).
* :func:`pixel_frechet_distance` — Fréchet distance between generated and real photographs
  downsampled to ``k×k`` pixels. Crude (no learned features) but cheap, deterministic and
  sensitive to what goes wrong at this scale: colour blotches, missing dark mouth gap, wrong
  layout. The floor is the distance between two sets of real photos (reported beside it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from ctrlora.evaluation.grids import save_grid
from ctrlora.evaluation.metrics import psnr_per_image, ssim_per_image


@torch.no_grad()
def text_to_image(backbone, prompts: list[str], steps: int = 20, guidance_scale: float = 3.0,
                  seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """uint8 images [N, H, W, 3] from noise; prompt ``i`` gets seed ``seed + i`` whatever the batch."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = backbone.vae.config.sample_size
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        res = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=gens, output_type="np")
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def to_uint8(photos: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((photos.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def backbone_samples(backbone, prompts: list[str], path: str | Path, real: torch.Tensor | None = None,
                     seed: int = 0, steps: int = 20, generated: np.ndarray | None = None) -> Path:
    """Grid: one row per prompt — generated from noise | a real photo with that caption."""
    gen = generated if generated is not None else text_to_image(backbone, prompts, steps=steps, seed=seed)
    real_u8 = to_uint8(real) if real is not None else None
    rows = [[gen[i]] + ([real_u8[i]] if real_u8 is not None else []) for i in range(len(prompts))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, path, titles=["generated", "real"] if real is not None else ["generated"])
    return path


@torch.no_grad()
def vae_reconstruction(vae, photos: torch.Tensor, conditions: dict[str, torch.Tensor] | None = None,
                       batch_size: int = 128) -> dict[str, float]:
    """Mean PSNR (dB) / SSIM of ``photos`` ([N, 3, H, W] in [-1, 1]) through the VAE's posterior
    mean, and the PSNR of each condition stack ([N, 3, H, W] in [0, 1])."""
    def roundtrip(x: torch.Tensor, lo: float) -> np.ndarray:
        parts = [vae.decode(vae.encode(x[i:i + batch_size]).latent_dist.mean).sample
                 for i in range(0, len(x), batch_size)]
        return torch.cat(parts).clamp(lo, 1.0).float().permute(0, 2, 3, 1).numpy()

    rec = roundtrip(photos, -1.0)
    ref = photos.permute(0, 2, 3, 1).numpy()
    out = {"photo_psnr": float(np.mean(psnr_per_image(rec, ref, data_range=2.0))),
           "photo_ssim": float(np.mean(ssim_per_image(rec, ref, data_range=2.0)))}
    for name, x in (conditions or {}).items():
        out[f"{name}_psnr"] = float(np.mean(psnr_per_image(roundtrip(x, 0.0), x.permute(0, 2, 3, 1).numpy(),
                                                           data_range=1.0)))
    return {k: round(v, 4) for k, v in out.items()}


def pixel_frechet_distance(a: np.ndarray, b: np.ndarray, size: int = 8) -> float:
    """Fréchet distance between two sets of uint8 images [N, H, W, 3], each downsampled to
    ``size × size`` (area average) and scaled to [-1, 1]."""
    def feats(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return torch.nn.functional.adaptive_avg_pool2d(t, size).flatten(1).double().numpy()

    fa, fb = feats(a), feats(b)
    mu = fa.mean(0) - fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    return round(float(mu @ mu + np.trace(ca + cb - 2.0 * np.real(root))), 4)
