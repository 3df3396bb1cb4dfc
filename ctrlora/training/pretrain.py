"""Pretraining of the tiny dental backbone (the embedded default's stand-in for SD 1.5).

Two phases, both through :class:`ctrlora.training.loop.Trainer`:

1. **VAE** — reconstruction (L1 + MSE) + a small KL term, on the photographs *and* on the
   condition images, each in the value range it will be fed at run time: photographs in [-1, 1]
   (as Stable Diffusion encodes images) and condition images in [0, 1] (as the CtrLoRA reference
   feeds them). SD's VAE saw both kinds of content in its own pretraining; ours must too, or the
   condition latents would be meaningless. Every batch holds a fixed share of photographs
   (``photo_fraction``, 0.5 by default) and condition images for the rest: drawing uniformly
   from the pooled images gave photos ~11 % of the batches (1 photo per 8 condition maps), and
   the photos' reconstructions — the ceiling of every generated image — stayed ~3 dB worse at
   the same cost. Afterwards the latent scaling factor is set to 1 / std of the photo latents
   (SD 1.5's 0.18215 was chosen the same way).
2. **Text-conditioned UNet** — trained under the scheduler's prediction type (v-prediction for
   the tiny preset) with Min-SNR-gamma weighting (:mod:`ctrlora.training.diffusion`), on the
   scaled photo latents, captions from the scan metadata, caption dropped to "" with a small
   probability so classifier-free guidance works; the tiny text encoder is trained with it (it
   starts random, unlike SD's CLIP). Warm-up + cosine schedule and EMA weights come from the
   training config (:class:`ctrlora.training.loop.TrainConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ctrlora.models.latents import sample_latent, tokenize
from ctrlora.training.diffusion import denoising_loss
from ctrlora.training.loop import TrainConfig, Trainer, TrainResult


@dataclass
class VAEPretrainConfig:
    train: TrainConfig
    kl_weight: float = 1e-6
    photo_fraction: float = 0.5  # share of every batch drawn from the photographs

    def __post_init__(self) -> None:
        if not 0.0 < self.photo_fraction <= 1.0:
            raise ValueError(f"photo_fraction must be in (0, 1], got {self.photo_fraction}")

    @classmethod
    def from_params(cls, section: Mapping[str, Any], where: str = "backbone.vae") -> "VAEPretrainConfig":
        """From params.yaml ``backbone.vae`` (unknown or missing keys refused)."""
        from ctrlora.params import checked_section

        p = checked_section(where, section, ("kl_weight", "photo_fraction", "train"))
        return cls(TrainConfig.from_dict(p["train"]), kl_weight=float(p["kl_weight"]),
                   photo_fraction=float(p["photo_fraction"]))


@dataclass
class UNetPretrainConfig:
    train: TrainConfig
    prompt_dropout: float = 0.1
    train_text_encoder: bool = True
    min_snr_gamma: float = 0.0  # 0 = plain MSE

    @classmethod
    def from_params(cls, section: Mapping[str, Any], where: str = "backbone.unet") -> "UNetPretrainConfig":
        """From params.yaml ``backbone.unet`` (unknown or missing keys refused;
        ``train_text_encoder`` may be left out: the text encoder then trains)."""
        from ctrlora.params import checked_section

        p = checked_section(where, section, ("prompt_dropout", "min_snr_gamma", "train"), ("train_text_encoder",))
        extra = {"train_text_encoder": bool(p["train_text_encoder"])} if "train_text_encoder" in p else {}
        return cls(TrainConfig.from_dict(p["train"]), prompt_dropout=float(p["prompt_dropout"]),
                   min_snr_gamma=float(p["min_snr_gamma"]), **extra)


class _Reconstruct(torch.nn.Module):
    """VAE round trip as one ``forward`` (so DDP sees the whole computation)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.mean + posterior.std * eps).sample
        return rec, posterior.kl()


class _Denoiser(torch.nn.Module):
    """Text encoder + UNet as one ``forward`` returning the noise prediction."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy, t, token_ids):
        ctx = self.text_encoder(token_ids)[0]
        return self.unet(noisy, t, encoder_hidden_states=ctx).sample


def pretrain_vae(vae: torch.nn.Module, photos: torch.Tensor, conditions: torch.Tensor | None,
                 cfg: VAEPretrainConfig, checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train ``vae`` to reconstruct ``photos`` and ``conditions`` ([N, 3, H, W] each, already in
    their feed ranges); ``round(batch * photo_fraction)`` of every batch are photos."""
    for name, t in (("photos", photos), ("conditions", conditions)):
        if t is not None and (t.ndim != 4 or t.shape[1] != 3):
            raise ValueError(f"{name} must be [N, 3, H, W], got {tuple(t.shape)}")
    b = cfg.train.batch_size
    n_photo = b if conditions is None or len(conditions) == 0 else max(1, round(b * cfg.photo_fraction))
    vae.requires_grad_(True)
    wrapper = _Reconstruct(vae)
    trainer = Trainer(cfg.train, wrapper, wrapper.parameters(), checkpoint_dir)
    latent_shape = None

    def loss_fn(model, step, gen):
        nonlocal latent_shape
        x = photos[torch.randint(0, len(photos), (n_photo,), generator=gen)]
        if n_photo < b:
            x = torch.cat([x, conditions[torch.randint(0, len(conditions), (b - n_photo,), generator=gen)]])
        x = x.to(trainer.accelerator.device)
        if latent_shape is None:
            with torch.no_grad():
                latent_shape = vae.encode(x[:1]).latent_dist.mean.shape[1:]
        eps = torch.randn((x.shape[0], *latent_shape), generator=gen).to(x.device)
        rec, kl = model(x, eps)
        rec = rec.float()
        l1 = F.l1_loss(rec, x)
        mse = F.mse_loss(rec, x)
        kl = kl.mean()
        photo_l1 = F.l1_loss(rec[:n_photo], x[:n_photo])
        return l1 + mse + cfg.kl_weight * kl, {"l1": l1.item(), "photo_l1": photo_l1.item(), "kl": kl.item()}

    result = trainer.fit(loss_fn, desc="vae")
    vae.requires_grad_(False)
    return result


def set_latent_scaling(vae: torch.nn.Module, mean: torch.Tensor, logvar: torch.Tensor, seed: int = 0) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / std of posterior samples, so latents have unit scale."""
    z = sample_latent(mean, logvar, 1.0, torch.Generator().manual_seed(seed))
    factor = float(1.0 / z.flatten().std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def pretrain_unet(unet: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer, scheduler,
                  latent_mean: torch.Tensor, latent_logvar: torch.Tensor, scaling_factor: float,
                  captions: list[str], cfg: UNetPretrainConfig,
                  checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train the text-conditioned UNet (and optionally the text encoder) on photo latents."""
    n = latent_mean.shape[0]
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} latents")
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    unet.requires_grad_(True)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    bundle = _Denoiser(unet, text_encoder)
    trainer = Trainer(cfg.train, bundle, bundle.parameters(), checkpoint_dir)
    n_train_t = scheduler.config.num_train_timesteps

    def loss_fn(model, step, gen):
        b = cfg.train.batch_size
        dev = trainer.accelerator.device
        idx = torch.randint(0, n, (b,), generator=gen)
        z = sample_latent(latent_mean[idx], latent_logvar[idx], scaling_factor, gen)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, n_train_t, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < cfg.prompt_dropout
        tok = torch.where(drop[:, None], empty[None, :], ids[idx])
        noisy = scheduler.add_noise(z, noise, t).to(dev)
        pred = model(noisy, t.to(dev), tok.to(dev))
        return denoising_loss(scheduler, pred, z, noise, t, cfg.min_snr_gamma), {}

    result = trainer.fit(loss_fn, desc="unet")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return result
