"""Shared helpers of the model tests: the reference fixture, residual lists, a tiny test backbone."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REF = Path(__file__).parent / "fixtures" / "reference"
N_RESIDUALS = 13


def tiny_ldm_kwargs() -> dict:
    return json.loads((REF / "tiny_config.json").read_text())["controlnet_kwargs"]


def tiny_reference_model():
    """CtrLoRAControlNet with the fixture's tiny ldm config mapped to diffusers (random init)."""
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.convert import controlnet_config_from_ldm

    return CtrLoRAControlNet(**controlnet_config_from_ldm(tiny_ldm_kwargs()))


def reference_io() -> dict:
    from safetensors.torch import load_file

    return load_file(str(REF / "tiny_io.safetensors"))


def tiny_test_config(**overrides):
    """A tiny backbone config sized here, not by ``params.yaml``, so the tests do not move with the
    pipeline's settings: 64 px, VAE (32, 64, 64), UNet (32, 64, 64) x 2 layers with 4/8/8 heads,
    32 groups, hidden 64, SD 1.5's epsilon schedule. ``overrides`` replace any field."""
    from ctrlora.models.backbone import SD15_SCHEDULER, TinyBackboneConfig

    sizes = dict(image_size=64, vae_block_out_channels=(32, 64, 64), vae_layers_per_block=1,
                 unet_block_out_channels=(32, 64, 64), unet_layers_per_block=2, unet_attention_heads=(4, 8, 8),
                 norm_num_groups=32, cross_attention_dim=64, text_hidden_size=64, scheduler=dict(SD15_SCHEDULER))
    return TinyBackboneConfig(**{**sizes, **overrides})


def residuals(out) -> list[torch.Tensor]:
    return list(out.down_block_res_samples) + [out.mid_block_res_sample]


def randomize_adapter(model, name: str, seed: int, scale: float = 0.2) -> None:
    """Give adapter ``name`` non-trivial values (LoRA B and the own copies perturbed)."""
    from ctrlora.models.adapters import adapter_tensor_refs

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in sorted(adapter_tensor_refs(model, name).items()):
            t.add_(scale * torch.randn(t.shape, generator=g))


def tiny_vocab() -> list[str]:
    return "a an the upper lower jaw molar incisor canine premolar tooth teeth gum gingiva shade view photo".split()


def tiny_eval_backbone(size: int = 32):
    """A tiny backbone for evaluation-shaped tests: ``size`` px (detectors need H, W divisible by 8),
    two-level VAE and UNet, one text layer."""
    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.backbone import build_tiny_backbone

    cfg = tiny_test_config(image_size=size, vae_block_out_channels=(32, 32), unet_block_out_channels=(32, 32),
                           unet_attention_heads=(2, 2), unet_layers_per_block=1, text_layers=1, vae_scaling_factor=0.5)
    return build_tiny_backbone(cfg, CAPTION_VOCABULARY)


def perturb(module, seed: int, scale: float = 0.05) -> None:
    """Add seeded gaussian noise to every parameter (e.g. non-zero zero-convs, so control acts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def save_tiny_models(root: Path, size: int, adapters_spec) -> None:
    """Under ``root``: a tiny backbone (``models/backbone``), a base ControlNet with non-zero zero
    convs (``models/base``, so the control changes the image) and one randomised adapter per
    ``(condition, k, seed)`` of ``adapters_spec`` in ``models/adapters/<condition>-<k>``, its
    config naming the condition."""
    from ctrlora.models import adapters
    from ctrlora.models.controlnet import CtrLoRAControlNet

    torch.manual_seed(0)
    bb = tiny_eval_backbone(size)
    bb.save(root / "models/backbone")
    cn = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    perturb(cn, 1)
    cn.save_pretrained(root / "models/base")
    want = adapters.base_hash(cn)
    for cond, k, seed in adapters_spec:
        name = f"{cond}{k}"
        adapters.add_adapter(cn, name, rank=2, own_modules=True)
        randomize_adapter(cn, name, seed=seed, scale=0.5)
        d = adapters.save_adapter(cn, name, root / "models/adapters" / f"{cond}-{k}", want)
        cfg = json.loads((d / adapters.ADAPTER_CONFIG).read_text())
        (d / adapters.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "condition": cond}))
