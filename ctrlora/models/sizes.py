"""``ctrlora sizes``: parameter counts of the Base ControlNet and of one adapter, as JSON.

Built on the meta device (no weights, no downloads): ``--preset sd15`` from the standard SD 1.5
UNet config, ``--preset tiny`` by :func:`ctrlora.models.backbone.tiny_unet` from ``params.yaml``
``backbone.tiny`` (the sizes the pipeline trains).

:func:`random_sd15_backbone` builds a whole SD 1.5 backbone with random weights from the same
written-out configs (tests and benchmarks of the SD 1.5 path; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The UNet config of Stable Diffusion 1.5 (diffusers layout), written out so nothing is fetched.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    flip_sin_to_cos=True,
    freq_shift=0,
    center_input_sample=False,
)


# SD 1.5's VAE (AutoencoderKL) and text encoder (CLIP ViT-L/14 text tower) configs.
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
)
SD15_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def random_sd15_backbone(vocabulary, seed: int = 0):
    """A :class:`ctrlora.models.backbone.Backbone` with SD 1.5's UNet, VAE and text encoder shapes
    and random weights (``seed``), the DDPM training schedule of SD 1.5 and a word-level tokenizer
    over ``vocabulary`` padding to 77 tokens (SD's BPE tokenizer is data that is not shipped here;
    the text states have SD's shape, 77 x 768). ``Backbone.save`` writes the diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ctrlora.models.backbone import SD15_SCHEDULER, Backbone, build_tokenizer

    tokenizer = build_tokenizer(vocabulary, max_length=SD15_TEXT_CONFIG["max_position_embeddings"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **SD15_TEXT_CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    for m in (vae, unet, text_encoder):
        m.eval()
    return Backbone(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                    scheduler=DDPMScheduler(**SD15_SCHEDULER))


def _meta_unet(preset: str, params_file: str | Path | None = None):
    """(UNet on the meta device, VAE downscaling factor) of ``preset``. ``tiny`` is built by the
    function that builds the pipeline's tiny backbone, from ``params.yaml`` ``backbone.tiny``."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if preset == "sd15":
        with init_empty_weights():
            return UNet2DConditionModel(**SD15_UNET_CONFIG), 8
    if preset == "tiny":
        from ctrlora.models.backbone import tiny_backbone_config, tiny_unet

        cfg = tiny_backbone_config(params_file)
        with init_empty_weights():
            return tiny_unet(cfg), cfg.vae_scale_factor
    raise ValueError(f"unknown preset {preset!r} (sd15 | tiny)")


def compute_sizes(preset: str = "sd15", rank: int = 128, condition_embedding: str = "vae",
                  params_file: str | Path | None = None) -> dict:
    """Parameter counts (and fp32 sizes) of the base ControlNet and one rank-``rank`` adapter
    (``params_file``: where ``tiny`` reads its sizes; default: the project's ``params.yaml``)."""
    from accelerate import init_empty_weights

    from ctrlora.models.adapters import adapter_param_counts, condition_modules, lora_targets
    from ctrlora.models.controlnet import CtrLoRAControlNet

    unet, factor = _meta_unet(preset, params_file)
    with init_empty_weights():
        cn = CtrLoRAControlNet.from_unet(unet, condition_embedding=condition_embedding, copy_weights=False,
                                         vae_scale_factor=factor)
    base = sum(p.numel() for p in cn.parameters())
    zero = sum(p.numel() for n, p in cn.named_parameters() if n.startswith("controlnet_down_blocks")
               or n.startswith("controlnet_mid_block"))
    hint = sum(p.numel() for n, p in cn.named_parameters() if n.startswith("controlnet_cond_embedding"))
    ad = adapter_param_counts(cn, rank)
    mods = condition_modules(cn)
    return {
        "preset": preset,
        "condition_embedding": condition_embedding,
        "rank": rank,
        "base_controlnet": {
            "params": base,
            "params_M": round(base / 1e6, 2),
            "zero_convs": zero,
            "hint_cnn": hint,
            "fp32_MB": round(base * 4 / 1e6, 1),
        },
        "adapter": {
            "params": ad["total"],
            "params_M": round(ad["total"] / 1e6, 2),
            "lora": ad["lora"],
            "zero_convs": ad["zero_convs"],
            "norms": ad["norms"],
            "lora_layers": len(lora_targets(cn)),
            "zero_conv_modules": sum(1 for m in mods if m.startswith("controlnet_")),
            "norm_modules": sum(1 for m in mods if not m.startswith("controlnet_")),
            "fp32_MB": round(ad["total"] * 4 / 1e6, 1),
        },
        "adapter_fraction_of_base": round(ad["total"] / base, 4),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank of the adapter (default 128)")
    parser.add_argument("--condition-embedding", choices=("vae", "cnn"), default="vae")
    parser.add_argument("--params", default=None,
                        help="params file whose backbone.tiny sizes --preset tiny (default: the project's params.yaml)")


def run(args) -> int:
    print(json.dumps(compute_sizes(args.preset, args.rank, args.condition_embedding, args.params), indent=1))
    return 0
