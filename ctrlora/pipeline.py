"""CtrLoRA sampling pipeline (diffusers ``DiffusionPipeline``).

Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (the Stable-Diffusion backbone),
``controlnet`` (a :class:`~ctrlora.models.controlnet.CtrLoRAControlNet` holding any number of
condition adapters) and ``scheduler`` (the backbone's; its config seeds the DDIM / DPM-Solver++
schedulers built per call).

What one call does, as the reference CtrLoRA samples:

* every condition image in [0, 1] goes through the frozen VAE encoder once per call; at **every
  step, for every CFG branch and every condition** a fresh posterior sample
  ``(mean + std * noise) * scaling_factor`` is drawn from the pipeline generator. The encoder is
  deterministic, so this is exactly the reference's "encode afresh on every call", without
  paying for the encoder at every step;
* the unconditional CFG branch keeps the conditions -- only its text is empty (or the negative
  prompt);
* the N conditions x the CFG pair x the B samples run through **one** ControlNet forward with
  per-sample adapters (``adapter_names=``); residuals are then summed with the condition
  weights, ``sum_i w_i * residuals_i`` (each residual already x ``control_strength``), and the
  UNet runs once on the CFG pair batch.

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
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ctrlora.models import adapters as A
from ctrlora.models.controlnet import CtrLoRAControlNet, posterior_params

BASE_ONLY = A.BASE_NAME  # "__base__": the base ControlNet with no adapter
SCHEDULERS = ("ddim", "dpm")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class CtrLoRAPipelineOutput(BaseOutput):
    """``images``: list of PIL images, float numpy [B, H, W, 3] in [0, 1], a tensor
    [B, 3, H, W] in [0, 1], or the final latents (``output_type="latent"``)."""

    images: Any


@dataclass
class _Condition:
    label: str
    adapter: str          # adapter name or BASE_ONLY
    weight: float
    images: torch.Tensor  # [1 or B, 3, H, W] float32 in [0, 1], on CPU


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
            if not (Path(d) / A.ADAPTER_CONFIG).is_file() or not (Path(d) / A.ADAPTER_WEIGHTS).is_file():
                raise FileNotFoundError(f"adapter {name!r}: {d} is not an adapter directory "
                                        f"(needs {A.ADAPTER_CONFIG} and {A.ADAPTER_WEIGHTS})")
        backbone = load_backbone(backbone_dir, torch_dtype=torch_dtype)
        controlnet = CtrLoRAControlNet.from_pretrained(base_dir, local_files_only=True, use_safetensors=True)
        want_hash = A.base_hash(controlnet) if adapters else None
        for name, d in adapters.items():
            recorded = A.read_adapter_config(d).get("condition")
            if check_names and recorded != name:
                raise ValueError(f"adapter {name!r}: {d} is an adapter for condition {recorded!r}; "
                                 f"name it {recorded!r} (or pass check_names=False)")
            A.load_adapter(controlnet, d, name=name, expected_base_hash=want_hash)
        A.set_adapter(controlnet, None)
        controlnet.eval()
        if torch_dtype is not None:
            controlnet.to(dtype=torch_dtype)
        pipe = cls.from_components(backbone, controlnet)
        if device is not None:
            pipe.to(device)
        return pipe

    @property
    def adapter_names(self) -> list[str]:
        return sorted(A.list_adapters(self.controlnet))

    # ------------------------------------------------------------------ pieces
    def encode_prompt(self, prompts: list[str], device, dtype) -> torch.Tensor:
        """Text states [len(prompts), L, D], as diffusers' Stable Diffusion pipeline makes them."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].to(dtype=dtype)

    def make_scheduler(self, name: str | SchedulerMixin) -> SchedulerMixin:
        """A fresh scheduler for one call: ``"ddim"`` (ldm's DDIM: final step to alpha_bar[0],
        i.e. ``set_alpha_to_one=False`` unless the backbone config says otherwise) or ``"dpm"``
        (DPM-Solver++ 2M); a scheduler instance is used as given."""
        if isinstance(name, SchedulerMixin):
            return name
        config = dict(self.scheduler.config)
        if name == "ddim":
            return DDIMScheduler.from_config(config, set_alpha_to_one=config.get("set_alpha_to_one", False))
        if name == "dpm":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        raise ValueError(f"scheduler must be one of {SCHEDULERS} (or a scheduler instance), got {name!r}")

    def _parse_conditions(self, conditions: Mapping[str, Any] | None) -> list[_Condition]:
        known = set(A.list_adapters(self.controlnet))
        out = []
        for label, value in (conditions or {}).items():
            if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
                raise TypeError(f"condition {label!r}: expected (image, weight) or (image, weight, adapter)")
            adapter = value[2] if len(value) == 3 else label
            if adapter != BASE_ONLY and adapter not in known:
                raise KeyError(f"unknown condition {adapter!r}: the ControlNet holds adapters "
                               f"{sorted(known)} (and {BASE_ONLY!r} = base only)")
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

    @staticmethod
    def _weighted_sum(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        """``sum_i w_i * stacked[i]`` in the order of :func:`ctrlora.models.adapters.combine_residuals`."""
        acc = stacked[0] * weights[0]
        for i in range(1, len(weights)):
            acc = acc + stacked[i] * weights[i]
        return acc

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
            down = [self._weighted_sum(r.view(n, m, *r.shape[1:]), weights) for r in out.down_block_res_samples]
            mid = self._weighted_sum(out.mid_block_res_sample.view(n, m, *out.mid_block_res_sample.shape[1:]),
                                     weights)
            return down, mid
        previous = A.active_adapter(cn)
        try:
            outs = []
            for i, name in enumerate(adapters):
                A.set_adapter(cn, None if name == BASE_ONLY else name)
                outs.append(cn(cond_inputs[i], timestep, text_states, sample=sample,
                               conditioning_scale=control_strength))
        finally:
            A.set_adapter(cn, previous)
        return A.combine_residuals(outs, list(weights))

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
            scheduler: ``"ddim"`` (``eta`` applies, default 0) or ``"dpm"`` (DPM-Solver++ 2M).
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
        device = self._execution_device
        dtype = self.unet.dtype
        cn_cfg = self.controlnet.config

        # ---- batch size: prompts and condition batches broadcast against each other
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
        total = batch * num_images_per_prompt
        gen = self._generators(seed, generator, total)

        # ---- size
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

        # ---- text: [uncond | cond] (diffusers' order)
        cfg = guidance_scale > 1.0
        text = self.encode_prompt(prompts, device, dtype).repeat_interleave(num_images_per_prompt, 0)
        if cfg:
            uncond = self.encode_prompt(negatives, device, dtype).repeat_interleave(num_images_per_prompt, 0)
            text = torch.cat([uncond, text])
        branches = 2 if cfg else 1

        # ---- scheduler and initial noise
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps, device=device)
        latent_shape = (total, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(latent_shape, generator=gen, device=device, dtype=dtype)
        elif tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {latent_shape}")
        latents = latents.to(device=device, dtype=dtype) * sched.init_noise_sigma
        step_kwargs = {}
        step_params = set(inspect.signature(sched.step).parameters)
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = gen

        # ---- conditions: posterior (mean, std) once per call, or the images for "cnn"
        names = [c.adapter for c in conds]
        weights = [c.weight for c in conds]
        cn_dtype = self.controlnet.dtype
        if conds and cn_cfg.condition_embedding == "vae":
            means, stds = [], []
            for c in conds:
                mean, logvar = posterior_params(self.vae, c.images.to(device))
                means.append(_expand_batch(mean, batch, num_images_per_prompt))
                stds.append(_expand_batch(torch.exp(0.5 * logvar), batch, num_images_per_prompt))
            cond_mean = torch.stack(means).to(cn_dtype)[:, None]  # [N, 1, total, C, h, w]
            cond_std = torch.stack(stds).to(cn_dtype)[:, None]
            scaling = self.vae.config.scaling_factor
        elif conds:
            hint = torch.stack([_expand_batch(c.images, batch, num_images_per_prompt) for c in conds])
            hint = hint.to(device=device, dtype=cn_dtype)[:, None].expand(-1, branches, -1, -1, -1, -1)
            hint = hint.reshape(len(conds), branches * total, *hint.shape[3:])

        # ---- denoising loop
        saved_bar = dict(getattr(self, "_progress_bar_config", {}) or {})
        if not progress:
            self._progress_bar_config = {**saved_bar, "disable": True}
        try:
            with self.progress_bar(total=len(sched.timesteps)) as bar:
                for t in sched.timesteps:
                    model_in = torch.cat([latents] * branches) if cfg else latents
                    model_in = sched.scale_model_input(model_in, t)
                    down = mid = None
                    if conds:
                        if cn_cfg.condition_embedding == "vae":
                            # a fresh posterior sample per condition, CFG branch and image
                            noise = self._noise(gen, len(conds) * branches, total, tuple(cond_mean.shape[3:]),
                                                device, cn_dtype)
                            noise = noise.view(len(conds), branches, total, *cond_mean.shape[3:])
                            cond_in = ((cond_mean + cond_std * noise) * scaling).reshape(
                                len(conds), branches * total, *cond_mean.shape[3:])
                            sample = None
                        else:
                            cond_in, sample = hint, model_in.to(cn_dtype)
                        down, mid = self.control_residuals(
                            cond_in, t, text.to(cn_dtype), names, weights, control_strength, sample=sample,
                            batched=batch_conditions)
                        down = [d.to(dtype) for d in down]
                        mid = mid.to(dtype)
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

        # ---- decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                      do_denormalize=[True] * decoded.shape[0])
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return CtrLoRAPipelineOutput(images=images)
