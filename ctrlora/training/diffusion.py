"""The denoising objective shared by every trainer: what the network predicts and how steps weigh.

* ``prediction_type`` comes from the backbone's scheduler config, so the same trainer serves an
  epsilon-prediction backbone (SD 1.5) and the tiny preset, which is trained with v-prediction
  (``v = sqrt(a) * noise - sqrt(1 - a) * x0``): at the few steps a CPU budget allows, v-prediction
  keeps the high-noise end of the schedule learnable, where epsilon targets carry almost no signal
  about the image.
* Min-SNR-gamma weighting (Hang et al., 2023) caps the weight of low-noise steps, which otherwise
  dominate the loss while contributing little to sample quality; ``gamma = 0`` is plain MSE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to output under ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep."""
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma for the scheduler's prediction type."""
    s = snr(scheduler, timesteps)
    capped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return capped / (s + 1.0)
    return capped / s


def denoising_loss(scheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE between ``pred`` and the scheduler's target; Min-SNR weighted when ``min_snr_gamma > 0``."""
    target = denoising_target(scheduler, latents, noise, timesteps).to(pred.device)
    if min_snr_gamma <= 0:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * min_snr_weights(scheduler, timesteps, min_snr_gamma).to(pred.device)).mean()
