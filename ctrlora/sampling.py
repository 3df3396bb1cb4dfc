"""CtrLoRA sampling pipeline (diffusers ``DiffusionPipeline``).

Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (the Stable-Diffusion backbone),
``controlnet`` (a :class:`~ctrlora.models.controlnet.CtrLoRAControlNet` holding any number of
condition adapters) and ``scheduler`` (the backbone's; its config seeds the scheduler built per call:
DDIM, DPM-Solver++ 2M, DPM-Solver++ 2M with Karras sigmas or UniPC, see :data:`SCHEDULERS`).

What one call does, as the reference CtrLoRA samples:

* every condition image in [0, 1] goes through the frozen VAE encoder once per call; at **every
  step, for every CFG branch and every condition** a fresh posterior sample
  ``(mean + std * noise) * scaling_factor`` is drawn from the pipeline generator
  (:func:`ctrlora.models.latents.sample_latent`, the trainers' rule). The encoder is
  deterministic, so this is exactly the reference's "encode afresh on every call", without
  paying for the encoder at every step;
* the unconditional CFG branch keeps the conditions -- only its text is empty (or the negative
  prompt);
* the N conditions x the CFG pair x the B samples run through **one** ControlNet forward with
  per-sample adapters (``adapter_names=``); residuals are then summed with the condition
  weights, ``sum_i w_i * residuals_i`` (each residual already x ``control_strength``;
  :func:`ctrlora.models.adapters.combine_residuals`), and the UNet runs once on the CFG pair
  batch.

``__call__`` runs in phases: prompts / batch / size, text states, :meth:`prepare_latents`,
:meth:`prepare_conditions`, :meth:`denoise`, decode.

Condition names are adapter names. ``"__base__"`` runs the base ControlNet without an adapter;
a value ``(image, weight, adapter)`` names the adapter explicitly, so the key is only a label
(e.g. two base-only conditions: ``{"a": (img_a, 1, "__base__"), "b": (img_b, .5, "__base__")}``).
``conditions={}`` is plain text-to-image with the backbone (no ControlNet call at all).

A ControlNet built with ``condition_embedding="cnn"`` (the ablation) gets the condition image in
[0, 1] itself plus the noisy latent; nothing is VAE-encoded then.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ctrlora.models.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_NAME, active_adapter, base_hash,
                                     combine_residuals, list_adapters, load_adapter, read_adapter_config,
                                     set_adapter)
from ctrlora.models.controlnet import CtrLoRAControlNet
from ctrlora.models.latents import encode_posterior, encode_text, sample_latent

# Fast samplers by name, each built from the backbone's scheduler config (same betas, prediction
# type and timestep spacing): DDIM; DPM-Solver++ 2M; the same with Karras sigmas; UniPC (bh2).
SCHEDULERS = ("ddim", "dpm", "dpm_karras", "unipc")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class CtrLoRAPipelineOutput(BaseOutput):
    """``images``: list of PIL images, float numpy [B, H, W, 3] in [0, 1], a tensor
    [B, 3, H, W] in [0, 1], or the final latents (``output_type="latent"``)."""

    images: Any


@dataclass
class _Condition:
    label: str
    adapter: str          # adapter name or BASE_NAME
    weight: float
    images: torch.Tensor  # [1 or B, 3, H, W] float32 in [0, 1], on CPU


@dataclass
class _ControlInputs:
    """What the ControlNet reads during one call: per condition its adapter and weight, and
    either the VAE posterior ``mean`` / ``logvar`` [N, 1, total, C, h, w] (``"vae"``) or the
    condition images ``hint`` [N, branches * total, 3, H, W] (``"cnn"``)."""

    adapters: list[str]
    weights: list[float]
    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    scaling_factor: float = 1.0
    hint: torch.Tensor | None = None


# ---------------------------------------------------------------------- condition images
def condition_to_tensor(image: Any, label: str = "condition") -> torch.Tensor:
    """PIL image(s), numpy H×W×3 / B×H×W×3 (uint8, or float in [0, 1]), or a tensor [3, H, W] /
    [B, 3, H, W] in [0, 1] -> float32 tensor [B, 3, H, W] in [0, 1]. Gray inputs (H×W, one
    channel) are repeated to RGB."""
    if isinstance(image, PIL.Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{label}: empty list of images")
        parts = [condition_to_tensor(x, label) for x in image]
        if len({tuple(p.shape[1:]) for p in parts}) != 1:
            raise ValueError(f"{label}: images of one batch differ in size: {[tuple(p.shape[2:]) for p in parts]}")
        return torch.cat(parts)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == bool or not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{label}: numpy images must be uint8 or float in [0, 1], got {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"{label}: numpy images must be H×W×3 or B×H×W×3, got shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)
    elif torch.is_tensor(image):
        t = image.detach().to("cpu")
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"{label}: tensors must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    else:
        raise TypeError(f"{label}: unsupported image type {type(image).__name__} "
                        "(PIL image, numpy array or torch tensor)")
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{label}: values must be in [0, 1] (got [{lo:.3g}, {hi:.3g}]); "
                         "the reference feeds condition images in [0, 1], not [-1, 1]")
    return t.clamp(0, 1).contiguous()


def make_scheduler(config: Mapping[str, Any], name: str | SchedulerMixin) -> SchedulerMixin:
    """A fresh scheduler named in :data:`SCHEDULERS`, built from a backbone scheduler ``config``
    (a scheduler instance is returned as given). DDIM keeps ldm's final step to alpha_bar[0]
    (``set_alpha_to_one=False`` unless the config says otherwise); the multistep solvers are
    order 2 with the data-prediction (``++``) form that guided sampling needs."""
    if isinstance(name, SchedulerMixin):
        return name
    config = dict(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=config.get("set_alpha_to_one", False))
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpm_karras":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=True)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, solver_order=2, solver_type="bh2", predict_x0=True)
    raise ValueError(f"scheduler must be one of {SCHEDULERS} (or a scheduler instance), got {name!r}")


def _expand_batch(x: torch.Tensor, batch: int, per_prompt: int) -> torch.Tensor:
    """[1 or B, ...] -> [B * per_prompt, ...] (each sample repeated ``per_prompt`` times in a row)."""
    if x.shape[0] == 1:
        return x.expand(batch * per_prompt, *x.shape[1:])
    return x.repeat_interleave(per_prompt, dim=0)


class CtrLoRAPipeline(DiffusionPipeline):
    r"""Text + condition images -> images with a CtrLoRA Base ControlNet and condition adapters.
    See the module docstring for the sampling procedure; ``__call__`` for the arguments."""

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet: CtrLoRAControlNet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._check_compatible()

    # ------------------------------------------------------------------ construction
    def _check_compatible(self) -> None:
        cn, unet = self.controlnet.config, self.unet.config
        if cn.condition_embedding == "vae" and cn.conditioning_channels != self.vae.config.latent_channels:
            raise ValueError(f"ControlNet reads {cn.conditioning_channels}-channel condition latents, "
                             f"the VAE makes {self.vae.config.latent_channels}")
        if cn.condition_embedding == "cnn":
            hint_factor = 2 ** (len(cn.conditioning_embedding_out_channels) - 1)
            if hint_factor != self.vae_scale_factor:
                raise ValueError(f"the ControlNet's hint CNN downsamples by {hint_factor}, "
                                 f"the VAE by {self.vae_scale_factor}")
        if tuple(cn.block_out_channels) != tuple(unet.block_out_channels) or \
                tuple(cn.down_block_types) != tuple(unet.down_block_types):
            raise ValueError("the ControlNet was not made from this UNet (block widths / types differ)")
        lpb = unet.layers_per_block
        if isinstance(lpb, int):
            levels = len(unet.down_block_types)
            want = 1 + levels * lpb + (levels - 1)
            have = len(self.controlnet.controlnet_down_blocks)
            if have != want:
                raise ValueError(f"the ControlNet makes {have} skip residuals, the UNet takes {want}")

    @classmethod
    def from_components(cls, backbone, controlnet: CtrLoRAControlNet) -> "CtrLoRAPipeline":
        """Pipeline from a loaded :class:`~ctrlora.models.backbone.Backbone` and a ControlNet
        (adapters already loaded into it)."""
        return cls(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                   unet=backbone.unet, controlnet=controlnet, scheduler=backbone.scheduler)

    @classmethod
    def from_pretrained_parts(
        cls,
        backbone_dir: str | Path,
        base_dir: str | Path,
        adapters: Mapping[str, str | Path] | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        check_names: bool = True,
    ) -> "CtrLoRAPipeline":
        """Load backbone (diffusers SD layout), base ControlNet (``save_pretrained`` dir) and the
        adapters ``{name: adapter_dir}``. Every adapter must record the hash of this base
        (refused otherwise); with ``check_names`` its recorded condition must equal its name.
        Hashes are checked on the weights as stored, before any ``torch_dtype`` cast."""
        from ctrlora.models.backbone import load_backbone

        base_dir = Path(base_dir)
        if not (base_dir / "config.json").is_file():
            raise FileNotFoundError(f"not a base ControlNet directory (no config.json): {base_dir}")
        adapters = dict(adapters or {})
        for name, d in adapters.items():
            if not (Path(d) / ADAPTER_CONFIG).is_file() or not (Path(d) / ADAPTER_WEIGHTS).is_file():
                raise FileNotFoundError(f"adapter {name!r}: {d} is not an adapter directory "
                                        f"(needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        backbone = load_backbone(backbone_dir, torch_dtype=torch_dtype)
        controlnet = CtrLoRAControlNet.from_pretrained(base_dir, local_files_only=True, use_safetensors=True)
        want_hash = base_hash(controlnet) if adapters else None
        for name, d in adapters.items():
            recorded = read_adapter_config(d).get("condition")
            if check_names and recorded != name:
                raise ValueError(f"adapter {name!r}: {d} is an adapter for condition {recorded!r}; "
                                 f"name it {recorded!r} (or pass check_names=False)")
            load_adapter(controlnet, d, name=name, expected_base_hash=want_hash)
        set_adapter(controlnet, None)
        controlnet.eval()
        if torch_dtype is not None:
            controlnet.to(dtype=torch_dtype)
        pipe = cls.from_components(backbone, controlnet)
        if device is not None:
            pipe.to(device)
        return pipe

    @property
    def adapter_names(self) -> list[str]:
        return sorted(list_adapters(self.controlnet))

    # ------------------------------------------------------------------ pieces
    def encode_prompt(self, prompts: list[str], device, dtype) -> torch.Tensor:
        """Text states [len(prompts), L, D], as diffusers' Stable Diffusion pipeline makes them."""
        states = encode_text(self.text_encoder, self.tokenizer, prompts, batch_size=None, out_device=None)
        return states.to(device=device, dtype=dtype)

    def make_scheduler(self, name: str | SchedulerMixin) -> SchedulerMixin:
        """A fresh scheduler for one call: ``"ddim"`` (ldm's DDIM: final step to alpha_bar[0],
        i.e. ``set_alpha_to_one=False`` unless the backbone config says otherwise) or ``"dpm"``
        (DPM-Solver++ 2M), ``"dpm_karras"`` (DPM-Solver++ 2M on Karras sigmas) or ``"unipc"``
        (UniPC, bh2 with its corrector); a scheduler instance is used as given."""
        return make_scheduler(self.scheduler.config, name)

    def _parse_conditions(self, conditions: Mapping[str, Any] | None) -> list[_Condition]:
        known = set(list_adapters(self.controlnet))
        out = []
        for label, value in (conditions or {}).items():
            if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
                raise TypeError(f"condition {label!r}: expected (image, weight) or (image, weight, adapter)")
            adapter = value[2] if len(value) == 3 else label
            if adapter != BASE_NAME and adapter not in known:
                raise KeyError(f"unknown condition {adapter!r}: the ControlNet holds adapters "
                               f"{sorted(known)} (and {BASE_NAME!r} = base only)")
            out.append(_Condition(label, adapter, float(value[1]), condition_to_tensor(value[0], f"condition {label!r}")))
        return out

    @staticmethod
    def _generators(seed, generator, batch: int):
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        g = generator if generator is not None else seed
        if g is None:
            return None
        if isinstance(g, (list, tuple)):
            if len(g) != batch:
                raise ValueError(f"{len(g)} seeds/generators for a batch of {batch} images")
            return [x if isinstance(x, torch.Generator) else torch.Generator("cpu").manual_seed(int(x)) for x in g]
        if isinstance(g, torch.Generator):
            return g
        return torch.Generator("cpu").manual_seed(int(g))

    @staticmethod
    def _noise(generator, lead: int, batch: int, tail: tuple, device, dtype) -> torch.Tensor:
        """Standard normal [lead, batch, *tail]. With one generator per sample, sample ``j``'s
        values come from its own generator only (so an image does not depend on its batch)."""
        if isinstance(generator, list):
            per = [torch.randn((lead, *tail), generator=g, device=g.device, dtype=dtype) for g in generator]
            return torch.stack(per, dim=1).to(device)
        return randn_tensor((lead * batch, *tail), generator=generator, device=device, dtype=dtype).view(
            lead, batch, *tail)

    def control_residuals(
        self,
        cond_inputs: torch.Tensor,
        timestep,
        text_states: torch.Tensor,
        adapters: Sequence[str],
        weights: Sequence[float],
        control_strength: float = 1.0,
        sample: torch.Tensor | None = None,
        batched: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Weighted multi-condition residuals for one step.

        ``cond_inputs``: [N, M, ...] -- per condition the M ControlNet inputs (condition latents,
        or images for ``"cnn"``) for the UNet batch of M (the CFG pair x B samples);
        ``text_states`` [M, L, D] and ``sample`` ([M, C, h, w], ``"cnn"`` only) are that batch's.
        ``batched=True``: one ControlNet forward over N x M samples with per-sample adapters;
        ``False``: N separate forwards, each with its adapter switched in (the reference's way).
        Either way the N residual lists are summed by :func:`combine_residuals`.
        Returns ``(down_block_res_samples, mid_block_res_sample)`` for the UNet (batch M)."""
        n, m = cond_inputs.shape[:2]
        if n != len(adapters) or n != len(weights):
            raise ValueError("one adapter name and one weight per condition")
        cn = self.controlnet
        if batched:
            out = cn(cond_inputs.reshape(n * m, *cond_inputs.shape[2:]), timestep, text_states.repeat(n, 1, 1),
                     sample=None if sample is None else sample.repeat(n, 1, 1, 1),
                     conditioning_scale=control_strength,
                     adapter_names=[name for name in adapters for _ in range(m)])
            down = [r.view(n, m, *r.shape[1:]) for r in out.down_block_res_samples]
            mid = out.mid_block_res_sample.view(n, m, *out.mid_block_res_sample.shape[1:])
            outs = [([r[i] for r in down], mid[i]) for i in range(n)]
            return combine_residuals(outs, list(weights))
        previous = active_adapter(cn)
        try:
            outs = []
            for i, name in enumerate(adapters):
                set_adapter(cn, None if name == BASE_NAME else name)
                outs.append(cn(cond_inputs[i], timestep, text_states, sample=sample,
                               conditioning_scale=control_strength))
        finally:
            set_adapter(cn, previous)
        return combine_residuals(outs, list(weights))

    # ------------------------------------------------------------------ one call, in phases
    @staticmethod
    def _prompt_batch(prompt, negative_prompt, conds: list[_Condition]) -> tuple[list[str], list[str], int]:
        """Prompts and negative prompts broadcast against the condition batches -> (prompts,
        negatives, B); each of them must hold 1 or B entries."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt")
        sizes = {len(prompts)} | {c.images.shape[0] for c in conds}
        batch = max(sizes)
        if sizes - {1, batch}:
            raise ValueError(f"batch sizes do not match: prompts {len(prompts)}, conditions "
                             f"{ {c.label: c.images.shape[0] for c in conds} } (each must be 1 or B)")
        if len(prompts) == 1:
            prompts = prompts * batch
        if negative_prompt is None:
            negatives = [""] * batch
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * batch
        else:
            negatives = list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for a batch of {batch}")
        return prompts, negatives, batch

    def _output_size(self, conds: list[_Condition], height: int | None, width: int | None) -> tuple[int, int]:
        """Output size (default: the conditions' size, else the UNet's sample size); condition
        images of another size are resized to it, bilinearly."""
        mult = self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        if height is None or width is None:
            shapes = {tuple(c.images.shape[2:]) for c in conds}
            if len(shapes) > 1:
                raise ValueError(f"condition images differ in size {sorted(shapes)}; pass height and width")
            h0, w0 = shapes.pop() if shapes else (self.unet.config.sample_size * self.vae_scale_factor,) * 2
            height, width = height or h0, width or w0
        if height % mult or width % mult:
            raise ValueError(f"height and width must be multiples of {mult}, got {height}x{width}")
        for c in conds:
            if tuple(c.images.shape[2:]) != (height, width):
                c.images = F.interpolate(c.images, size=(height, width), mode="bilinear",
                                         align_corners=False, antialias=True).clamp(0, 1)
        return height, width

    def _text_states(self, prompts: list[str], negatives: list[str] | None, per_prompt: int,
                     device, dtype) -> torch.Tensor:
        """Text states of the UNet batch: ``[uncond | cond]`` (diffusers' order) with CFG
        (``negatives`` given), else the prompts' alone."""
        text = self.encode_prompt(prompts, device, dtype).repeat_interleave(per_prompt, 0)
        if negatives is None:
            return text
        uncond = self.encode_prompt(negatives, device, dtype).repeat_interleave(per_prompt, 0)
        return torch.cat([uncond, text])

    def prepare_latents(self, sched: SchedulerMixin, total: int, height: int, width: int, generator,
                        latents: torch.Tensor | None, device, dtype) -> torch.Tensor:
        """Initial latents [total, C, h, w]: ``latents`` or standard normal noise, times the
        scheduler's ``init_noise_sigma``."""
        latent_shape = (total, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {latent_shape}")
        return latents.to(device=device, dtype=dtype) * sched.init_noise_sigma

    def prepare_conditions(self, conds: list[_Condition], batch: int, per_prompt: int, branches: int,
                           device) -> _ControlInputs | None:
        """What the ControlNet reads, prepared once per call (``None`` without conditions):
        ``"vae"``: every condition's posterior (the VAE encoder is deterministic, so encoding once
        and drawing a fresh sample at every step equals the reference's encode-on-every-call);
        ``"cnn"``: the condition images themselves, for every CFG branch."""
        if not conds:
            return None
        control = _ControlInputs([c.adapter for c in conds], [c.weight for c in conds])
        cn_dtype = self.controlnet.dtype
        if self.controlnet.config.condition_embedding == "vae":
            means, logvars = [], []
            for c in conds:
                mean, logvar = encode_posterior(self.vae, c.images, batch_size=None, out_device=None)
                means.append(_expand_batch(mean, batch, per_prompt))
                logvars.append(_expand_batch(logvar, batch, per_prompt))
            control.mean = torch.stack(means).to(cn_dtype)[:, None]  # [N, 1, total, C, h, w]
            control.logvar = torch.stack(logvars).to(cn_dtype)[:, None]
            control.scaling_factor = self.vae.config.scaling_factor
        else:
            hint = torch.stack([_expand_batch(c.images, batch, per_prompt) for c in conds])
            hint = hint.to(device=device, dtype=cn_dtype)[:, None].expand(-1, branches, -1, -1, -1, -1)
            control.hint = hint.reshape(len(conds), branches * hint.shape[2], *hint.shape[3:])
        return control

    def _step_residuals(self, control: _ControlInputs, t, model_in: torch.Tensor, text: torch.Tensor,
                        generator, branches: int, control_strength: float, batched: bool):
        """The weighted ControlNet residuals of one step. ``"vae"``: a fresh posterior sample per
        condition, CFG branch and image; ``"cnn"``: the images plus the noisy latent."""
        cn_dtype = self.controlnet.dtype
        n, total = len(control.adapters), model_in.shape[0] // branches
        if control.hint is not None:
            cond_in, sample = control.hint, model_in.to(cn_dtype)
        else:
            tail = tuple(control.mean.shape[3:])
            noise = self._noise(generator, n * branches, total, tail, model_in.device, cn_dtype)
            noise = noise.view(n, branches, total, *tail)
            cond_in = sample_latent(control.mean.expand(noise.shape), control.logvar.expand(noise.shape),
                                    control.scaling_factor, noise=noise).reshape(n, branches * total, *tail)
            sample = None
        return self.control_residuals(cond_in, t, text.to(cn_dtype), control.adapters, control.weights,
                                      control_strength, sample=sample, batched=batched)

    def denoise(self, latents: torch.Tensor, text: torch.Tensor, sched: SchedulerMixin,
                control: _ControlInputs | None, generator, guidance_scale: float, control_strength: float,
                eta: float, progress: bool, batched: bool) -> torch.Tensor:
        """The sampling loop: ControlNet residuals (if any conditions), UNet, CFG, scheduler step."""
        cfg = guidance_scale > 1.0
        branches = 2 if cfg else 1
        dtype = latents.dtype
        step_params = set(inspect.signature(sched.step).parameters)
        step_kwargs = {}
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator
        saved_bar = dict(getattr(self, "_progress_bar_config", {}) or {})
        if not progress:
            self._progress_bar_config = {**saved_bar, "disable": True}
        try:
            with self.progress_bar(total=len(sched.timesteps)) as bar:
                for t in sched.timesteps:
                    model_in = torch.cat([latents] * branches) if cfg else latents
                    model_in = sched.scale_model_input(model_in, t)
                    down = mid = None
                    if control is not None:
                        down, mid = self._step_residuals(control, t, model_in, text, generator, branches,
                                                         control_strength, batched)
                        down, mid = [d.to(dtype) for d in down], mid.to(dtype)
                    noise_pred = self.unet(model_in, t, encoder_hidden_states=text,
                                           down_block_additional_residuals=down,
                                           mid_block_additional_residual=mid).sample
                    if cfg:
                        uncond_pred, text_pred = noise_pred.chunk(2)
                        noise_pred = uncond_pred + guidance_scale * (text_pred - uncond_pred)
                    latents = sched.step(noise_pred, t, latents, **step_kwargs).prev_sample
                    bar.update()
        finally:
            self._progress_bar_config = saved_bar
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return self.image_processor.postprocess(decoded, output_type=output_type,
                                                do_denormalize=[True] * decoded.shape[0])

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        conditions: Mapping[str, tuple] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        scheduler: str | SchedulerMixin = "ddim",
        control_strength: float = 1.0,
        seed: int | list[int] | torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        progress: bool = True,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        batch_conditions: bool = True,
        return_dict: bool = True,
    ):
        r"""Generate images.

        Args:
            prompt: one prompt or B prompts.
            conditions: ``{name: (image, weight)}`` or ``{label: (image, weight, adapter)}``;
                ``name``/``adapter`` is an adapter of the ControlNet or ``"__base__"``. An image
                is one image (shared by the batch) or a batch of B ([B, 3, H, W] tensor,
                B×H×W×3 array, list of PIL). ``{}`` / ``None``: text-to-image, no ControlNet.
            num_inference_steps, guidance_scale: sampling steps; CFG scale (<= 1: no CFG).
            negative_prompt: text of the unconditional branch (default ``""``); that branch
                keeps the conditions.
            scheduler: ``"ddim"`` (``eta`` applies, default 0), ``"dpm"`` (DPM-Solver++ 2M),
                ``"dpm_karras"`` (the same on Karras sigmas), ``"unipc"`` or a scheduler instance.
            control_strength: scale of every residual (the reference's control strength).
            seed: int, one int per image, a ``torch.Generator`` or one per image (per-image
                generators make every image independent of its batch); ``generator`` is an
                alias. ``None``: torch's global RNG.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            progress: show the progress bar.
            num_images_per_prompt: images per prompt (and per condition image).
            height, width: output size; default: the condition images' size (conditions of
                another size are resized bilinearly), else the UNet's sample size.
            latents: optional initial noise [B, C, h, w] (scaled by the scheduler's
                ``init_noise_sigma`` like diffusers does).
            batch_conditions: ``False`` runs one ControlNet forward per condition with its
                adapter switched in (the reference's loop; same numbers, slower) -- for checks.
        Returns:
            :class:`CtrLoRAPipelineOutput` (``.images``), or ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be >= 1")
        conds = self._parse_conditions(conditions)
        device, dtype = self._execution_device, self.unet.dtype
        prompts, negatives, batch = self._prompt_batch(prompt, negative_prompt, conds)
        total = batch * num_images_per_prompt
        gen = self._generators(seed, generator, total)
        height, width = self._output_size(conds, height, width)
        cfg = guidance_scale > 1.0
        text = self._text_states(prompts, negatives if cfg else None, num_images_per_prompt, device, dtype)

        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(sched, total, height, width, gen, latents, device, dtype)
        control = self.prepare_conditions(conds, batch, num_images_per_prompt, 2 if cfg else 1, device)
        latents = self.denoise(latents, text, sched, control, gen, guidance_scale, control_strength, eta,
                               progress, batch_conditions)

        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return CtrLoRAPipelineOutput(images=images)
