"""Training the Base ControlNet and condition adapters (and the full-ControlNet baselines).

The loss is the one of ControlNet / CtrLoRA: the frozen UNet denoises a noisy photo latent with
the ControlNet's residuals added to its skips, and only the ControlNet side learns. The target is
the backbone's own (epsilon for SD 1.5, v for the tiny preset; :mod:`ctrlora.training.diffusion`),
unweighted MSE as in the reference. Everything comes from the embed cache (fresh posterior samples every step), except in
the ``cnn`` ablation, whose hint CNN reads the condition *image*.

Modes (see :func:`ctrlora.models.adapters.set_trainable`):

``base``     every mini-batch holds one base condition (a fresh random order of the conditions
             every round) with that condition's LoRA active; the shared base, its zero convs and
             norms and the active LoRA train together; prompt dropped to "" with p = 0.3.
``adapter``  new condition: base frozen, only the condition's adapter (LoRA + own zero convs +
             own norms) trains.
``full``     baselines: every ControlNet weight trains (a full ControlNet fine-tune).

Under ``accelerate launch`` with P processes, ``batch_size`` stays the batch of one optimiser
step: every process draws the whole step (same pairs, noise, timesteps) and runs its 1/P share
(:class:`~ctrlora.training.loop.Trainer` ``global_batch``), so the result does not depend on P.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from accelerate import DistributedDataParallelKwargs

from ctrlora.models.adapters import set_adapter, set_trainable
from ctrlora.models.latents import sample_latent
from ctrlora.training.diffusion import denoising_loss
from ctrlora.training.embed import EmbedCache
from ctrlora.training.loop import TrainConfig, Trainer, TrainResult, make_accelerator


@dataclass
class ControlNetTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    prompt_dropout: float = 0.3

    @classmethod
    def from_params(cls, section: Mapping[str, Any], where: str = "train_base",
                    also: Sequence[str] = ()) -> "ControlNetTrainConfig":
        """From a params section that holds ``train`` (:meth:`TrainConfig.from_dict`) and
        ``prompt_dropout`` (``train_base``); ``also``: the section's other keys, which the caller
        reads. Unknown or missing keys are refused, naming ``where``."""
        from ctrlora.params import checked_section

        p = checked_section(where, section, ("train", "prompt_dropout", *also))
        return cls(TrainConfig.from_dict(p["train"]), prompt_dropout=float(p["prompt_dropout"]))


class ControlledDenoiser(torch.nn.Module):
    """ControlNet + frozen UNet as one ``forward`` (so DDP sees the whole computation)."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, noisy, t, text, cond):
        down, mid = self.controlnet(cond, t, text, sample=noisy, return_dict=False)
        return self.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


def condition_schedule(conditions: Sequence[str], seed: int, step: int) -> str:
    """The condition of ``step`` (1-based): a fresh random order of all conditions every round."""
    n = len(conditions)
    rnd, pos = divmod(step - 1, n)
    g = torch.Generator().manual_seed(seed * 65_537 + rnd)
    return conditions[int(torch.randperm(n, generator=g)[pos])]


def make_trainer(cfg: ControlNetTrainConfig, model, params, checkpoint_dir, unused: bool) -> Trainer:
    """The project's :class:`Trainer` over ``params`` of ``model`` (a :class:`ControlledDenoiser`).
    ``unused``: some trainable parameters may get no gradient in a step (DDP must be told)."""
    # base training leaves the inactive conditions' LoRA unused in a step
    acc = make_accelerator(cfg.train, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])
    apply_memory_options(cfg.train, model)
    return Trainer(cfg.train, model, params, checkpoint_dir, accelerator=acc, global_batch=True)


def apply_memory_options(cfg: TrainConfig, model: ControlledDenoiser) -> None:
    """The model side of ``cfg``'s memory options: ``gradient_checkpointing`` on the ControlNet
    and the frozen UNet (the UNet's activations are what the residuals' gradients flow back
    through, so they are most of a step's memory at SD scale); ``cast_frozen``: see
    :func:`cast_frozen_weights`."""
    if cfg.gradient_checkpointing:
        model.controlnet.enable_gradient_checkpointing()
        model.unet.enable_gradient_checkpointing()
    if cfg.cast_frozen:
        if any(p.requires_grad for p in model.unet.parameters()):
            raise ValueError("cast_frozen: the UNet has trainable weights; only a frozen UNet is cast")
        cast_frozen_weights(model.controlnet, model.unet, cfg.half_dtype)


def cast_frozen_weights(controlnet, unet, dtype: torch.dtype) -> int:
    """Store every weight that does not train in ``dtype`` (bf16 / fp16): the whole frozen UNet
    and, in adapter training, the frozen base of the ControlNet (SD 1.5: 3.4 GB -> 1.7 GB and
    1.44 GB -> 0.72 GB). Trained parameters stay fp32 (the optimiser's master copy); autocast
    runs every matmul / conv in ``dtype`` anyway, so the forward is the same up to the rounding of
    the frozen weights, which happens in place on the caller's modules (reload them in fp32 to
    sample without autocast). Full fine-tunes have nothing frozen in the ControlNet, so only
    their UNet is cast. Returns the number of parameters cast; calling it again casts nothing."""
    n = 0
    # nn.Module.to: diffusers' own .to() warns about fp32-only modules, which the UNet has none of
    n += sum(p.numel() for p in unet.parameters() if p.dtype != dtype)
    torch.nn.Module.to(unet, dtype)
    with torch.no_grad():
        for p in controlnet.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += p.numel()
    return n


def controlnet_loss(model, cache: EmbedCache, scheduler, condition: str, rows: torch.Tensor, cfg: ControlNetTrainConfig,
               gen: torch.Generator, device, condition_images: torch.Tensor | None = None,
               share: slice | None = None):
    """One training step's loss of ``condition``: a batch of ``rows`` (its cached pairs), fresh
    posterior samples of photo and condition latents, prompt dropout, noise and timesteps, all
    drawn from ``gen`` in that order; the denoising loss of the backbone's prediction type.
    ``share``: the rows of the drawn batch this process trains on (None: all of them)."""
    b = cfg.train.batch_size
    pick = rows[torch.randint(0, len(rows), (b,), generator=gen)]
    ce = cache.conditions[condition]
    photo = ce.photo_index[pick]
    z = sample_latent(cache.photo_mean[photo], cache.photo_logvar[photo], cache.scaling_factor, gen)
    c = sample_latent(ce.mean[pick], ce.logvar[pick], cache.scaling_factor, gen)
    if condition_images is not None:  # "cnn" ablation: the hint CNN reads the image
        c = condition_images[pick]
    text = cache.text[photo]
    drop = torch.rand(b, generator=gen) < cfg.prompt_dropout
    text = torch.where(drop[:, None, None], cache.empty_text.expand_as(text), text)
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
    noisy = scheduler.add_noise(z, noise, t)
    if share is not None:
        z, noise, t, noisy, text, c = (x[share] for x in (z, noise, t, noisy, text, c))
    pred = model(noisy.to(device), t.to(device), text.to(device), c.to(device))
    return denoising_loss(scheduler, pred, z, noise, t)


def base_schedule(conditions: Sequence[str], shares: Mapping[str, int] | None = None) -> list[str]:
    """The list whose fresh random order makes each round of base training: every condition once,
    then ``shares[c] - 1`` more copies of ``c`` (``{"canny": 2}``: canny in 2 of every 5 steps of
    four conditions). A condition with a larger share is trained more, the others as often per round."""
    shares = dict(shares or {})
    unknown = sorted(set(shares) - set(conditions))
    if unknown:
        raise ValueError(f"condition_shares names conditions that are not base conditions: {unknown}")
    bad = {c: n for c, n in shares.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
    if bad:
        raise ValueError(f"condition_shares must be whole numbers >= 1, got {bad}")
    return list(conditions) + [c for c in conditions for _ in range(shares.get(c, 1) - 1)]


def train_base(controlnet, unet, scheduler, cache: EmbedCache, conditions: Sequence[str], cfg: ControlNetTrainConfig,
               checkpoint_dir: str | Path | None = None, on_log: Callable[[dict], None] | None = None,
               shares: Mapping[str, int] | None = None) -> TrainResult:
    """Base training over ``conditions``; each must already have a LoRA-only adapter of that name
    (``add_adapter(controlnet, c, rank, own_modules=False)``). ``shares``: see :func:`base_schedule`."""
    if not conditions:
        raise ValueError("base training needs at least one base condition")
    schedule = base_schedule(conditions, shares)
    params: dict[int, torch.nn.Parameter] = {}
    for c in conditions:
        for p in set_trainable(controlnet, "base", c):
            params[id(p)] = p
    for p in params.values():  # set_trainable leaves only the last condition's LoRA on
        p.requires_grad_(True)
    unet.requires_grad_(False)
    rows = {c: cache.pair_rows(c, "train") for c in conditions}
    model = ControlledDenoiser(controlnet, unet)
    trainer = make_trainer(cfg, model, list(params.values()), checkpoint_dir, unused=len(conditions) > 1)
    device = trainer.accelerator.device

    def loss_fn(m, step, gen):
        cond = condition_schedule(schedule, cfg.train.seed, step)
        set_adapter(controlnet, cond)
        loss = controlnet_loss(m, cache, scheduler, cond, rows[cond], cfg, gen, device, share=trainer.share())
        return loss, {f"loss/{cond}": loss.item()}

    return trainer.fit(loss_fn, desc="train_base", on_log=on_log)


def train_condition(controlnet, unet, scheduler, cache: EmbedCache, condition: str, cfg: ControlNetTrainConfig,
                    mode: str = "adapter", checkpoint_dir: str | Path | None = None,
                    condition_images: torch.Tensor | None = None, max_pairs: int | None = None,
                    on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train one condition: ``mode="adapter"`` (its adapter only; the adapter named ``condition``
    must exist with own modules) or ``"full"`` (every ControlNet weight: the full fine-tune
    baselines). ``max_pairs`` limits the training pairs (the first ones of a fixed shuffle)."""
    if mode == "adapter":
        params = set_trainable(controlnet, "adapter", condition)
    elif mode == "full":
        controlnet.requires_grad_(True)
        params = list(controlnet.parameters())
    else:
        raise ValueError(f"mode must be 'adapter' or 'full', got {mode!r}")
    unet.requires_grad_(False)
    rows = cache.pair_rows(condition, "train")
    if max_pairs:
        g = torch.Generator().manual_seed(cfg.train.seed)
        rows = rows[torch.randperm(len(rows), generator=g)[:max_pairs]]
    model = ControlledDenoiser(controlnet, unet)
    trainer = make_trainer(cfg, model, params, checkpoint_dir, unused=False)
    device = trainer.accelerator.device

    def loss_fn(m, step, gen):
        return controlnet_loss(m, cache, scheduler, condition, rows, cfg, gen, device, condition_images,
                               share=trainer.share()), {}

    return trainer.fit(loss_fn, desc=f"train_{mode}[{condition}]", on_log=on_log)
