"""VAE latents and text states: the one implementation used by training, the embed cache, the
sampling pipeline and the benchmarks.

* :func:`encode_posterior` -- the VAE posterior ``(mean, logvar)`` of images, in batches;
* :func:`sample_latent` -- a posterior sample ``(mean + std * noise) * scaling_factor``;
* :func:`encode_condition` -- condition images in [0, 1] -> a fresh condition latent;
* :func:`tokenize` / :func:`encode_text` -- captions -> token ids -> text-encoder states.

The reference CtrLoRA samples the posterior (not its mode) afresh on every call, so what is
stored or carried between steps is ``(mean, logvar)`` and every use draws a new sample with
:func:`sample_latent`. Its log-variance rule is diffusers' ``DiagonalGaussianDistribution``:
clamped to ``[LOGVAR_MIN, LOGVAR_MAX]`` (a posterior read from diffusers is already clamped, so
clamping again changes nothing; a cached or hand-made one gets the same rule).
"""
from __future__ import annotations

from typing import Sequence

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@torch.no_grad()
def encode_posterior(
    vae: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int | None = 256,
    out_device: torch.device | str | None = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled VAE posterior ``(mean, logvar)`` of ``images`` [N, 3, H, W] (each already in the
    range it is fed: photographs in [-1, 1], condition images in [0, 1]).

    The images go to the VAE's device and dtype ``batch_size`` at a time (``None``: all at once);
    the results are gathered on ``out_device`` (``None``: the VAE's device)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    device, dtype = _device(vae), _dtype(vae)
    step = images.shape[0] if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    means, logvars = [], []
    for i in range(0, images.shape[0], step):
        dist = vae.encode(images[i:i + step].to(device=device, dtype=dtype)).latent_dist
        means.append(dist.mean if out_device is None else dist.mean.to(out_device))
        logvars.append(dist.logvar if out_device is None else dist.logvar.to(out_device))
    if len(means) == 1:
        return means[0], logvars[0]
    return torch.cat(means), torch.cat(logvars)


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """The log-variance rule of diffusers' ``DiagonalGaussianDistribution``."""
    return torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_latent(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(mean + exp(logvar / 2) * noise) * scaling_factor``, log-variance clamped as
    :func:`clamp_logvar`.

    ``noise`` defaults to a standard normal drawn in float32 on ``generator``'s device (on
    ``mean``'s device without a generator) and then moved to ``mean``'s device and dtype, so a
    seeded generator gives the same sample wherever ``mean`` lives. Pass ``noise`` when the
    draw has its own layout (e.g. one generator per image in the sampling pipeline)."""
    std = torch.exp(0.5 * clamp_logvar(logvar))
    if noise is None:
        draw_on = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=draw_on, dtype=torch.float32)
        noise = noise.to(device=mean.device, dtype=mean.dtype)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the posterior {tuple(mean.shape)}")
    return (mean + std * noise) * scaling_factor


def encode_condition(vae, images01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Condition image(s) [B, 3, H, W] in **[0, 1]** -> condition latent, as the reference does it:
    a fresh *sample* of the VAE posterior (not its mode) times ``vae.config.scaling_factor``.
    Call it anew for every step / CFG branch / adapter to stay faithful."""
    if images01.min() < -1e-3 or images01.max() > 1 + 1e-3:
        raise ValueError("condition images must be in [0, 1] (the reference feeds the VAE [0, 1], not [-1, 1])")
    mean, logvar = encode_posterior(vae, images01, batch_size=None, out_device=None)
    return sample_latent(mean, logvar, vae.config.scaling_factor, generator)


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [len(captions), model_max_length]: padded to the tokenizer's maximum length and
    truncated to it, as Stable Diffusion tokenizes prompts."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(
    text_encoder: torch.nn.Module,
    tokenizer,
    captions: Sequence[str],
    batch_size: int | None = 256,
    out_device: torch.device | str | None = "cpu",
) -> torch.Tensor:
    """Text-encoder states [len(captions), L, D] (its first output), ``batch_size`` captions at a
    time (``None``: all at once), gathered on ``out_device`` (``None``: the encoder's device).
    An encoder whose config sets ``use_attention_mask`` gets the padding mask, as diffusers'
    Stable Diffusion pipeline passes it."""
    captions = list(captions)
    if not captions:
        raise ValueError("no captions to encode")
    device = _device(text_encoder)
    step = len(captions) if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    use_mask = getattr(getattr(text_encoder, "config", None), "use_attention_mask", False)
    out = []
    for i in range(0, len(captions), step):
        ids = tokenize(tokenizer, captions[i:i + step]).to(device)
        mask = (ids != tokenizer.pad_token_id).long() if use_mask else None
        states = text_encoder(ids, attention_mask=mask)[0]
        out.append(states if out_device is None else states.to(out_device))
    return out[0] if len(out) == 1 else torch.cat(out)
