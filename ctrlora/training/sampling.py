"""Samples from the pretrained backbone alone (no control): the proof that the tiny backbone
draws recognisable dental images from noise, as a grid a person can look at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctrlora.evaluation.grids import save_grid


@torch.no_grad()
def text_to_image(backbone, prompts: list[str], steps: int = 20, guidance_scale: float = 3.0,
                  seed: int = 0) -> np.ndarray:
    """Plain text-to-image with diffusers' Stable Diffusion pipeline over the backbone's parts;
    returns uint8 images [N, H, W, 3]."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = backbone.vae.config.sample_size
    out = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def backbone_samples(backbone, prompts: list[str], path: str | Path, real: torch.Tensor | None = None,
                     seed: int = 0, steps: int = 20) -> Path:
    """Grid: one row per prompt — generated from noise | a real training photo with that caption."""
    gen = text_to_image(backbone, prompts, steps=steps, seed=seed)
    rows = []
    for i, img in enumerate(gen):
        row = [img]
        if real is not None:
            row.append(((real[i].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8))
        rows.append(row)
    titles = ["generated", "real"] if real is not None else ["generated"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, path, titles=titles)
    return path
