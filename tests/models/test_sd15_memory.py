"""The training memory options (used by the SD 1.5 recipe) on the tiny test backbone: presets,
checkpointing that changes memory but not results, the frozen UNet cast, 8-bit AdamW's clear
refusal without bitsandbytes, the default attention (SDPA)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from _models_helpers import tiny_test_config

from ctrlora.training.loop import MEMORY_PRESETS, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_presets_expand_and_explicit_options_win():
    cfg = TrainConfig.from_dict({"memory_preset": "16gb_no_bnb", "max_steps": 3})
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.cast_frozen, cfg.optimizer) == \
        ("bf16", True, True, "adamw")
    assert TrainConfig.from_dict({"memory_preset": "16gb", "mixed_precision": "fp16"}).mixed_precision == "fp16"
    assert TrainConfig.from_dict({"memory_preset": "16gb"}).optimizer == "adamw8bit"
    defaults = TrainConfig()
    assert (defaults.mixed_precision, defaults.gradient_checkpointing, defaults.cast_frozen, defaults.optimizer) == \
        ("no", False, False, "adamw")
    with pytest.raises(ValueError, match="unknown memory_preset 'huge'"):
        TrainConfig.from_dict({"memory_preset": "huge"})
    with pytest.raises(ValueError, match="cast_frozen needs mixed_precision"):
        TrainConfig(cast_frozen=True)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")
    assert set(MEMORY_PRESETS) == {"16gb", "16gb_no_bnb"}


def _setup():
    from ctrlora.models.adapters import add_adapter
    from ctrlora.models.backbone import build_tiny_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.embed import ConditionEmbeds, EmbedCache

    cfg = tiny_test_config(image_size=32, vae_block_out_channels=(32, 32), unet_block_out_channels=(32, 32),
                           unet_attention_heads=(2, 2), unet_layers_per_block=1, text_layers=1)
    bb = build_tiny_backbone(cfg, ["upper", "molar"])
    torch.manual_seed(0)
    cn = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae", vae_scale_factor=bb.vae_scale_factor)
    cn.requires_grad_(False)
    add_adapter(cn, "c", rank=4, own_modules=True)
    g = torch.Generator().manual_seed(0)
    rows, lat, txt = 4, (4, 16, 16), (32, 64)
    cache = EmbedCache([f"r{i}" for i in range(rows)], ["train"] * rows, [""] * rows, 0.18215,
                       torch.randn((rows, *lat), generator=g), torch.full((rows, *lat), -6.0),
                       torch.randn((rows, *txt), generator=g), torch.randn((1, *txt), generator=g),
                       {"c": ConditionEmbeds(torch.arange(rows), torch.randn((rows, *lat), generator=g),
                                             torch.full((rows, *lat), -6.0))})
    return bb, cn, cache


def _train(options: dict):
    from ctrlora.training.controlnet import ControlNetTrainConfig, train_condition

    bb, cn, cache = _setup()
    cfg = ControlNetTrainConfig(TrainConfig.from_dict({"max_steps": 2, "batch_size": 2, "log_every": 1, **options}))
    res = train_condition(cn, bb.unet, bb.scheduler, cache, "c", cfg)
    return res, bb.unet, cn


def test_checkpointing_same_losses_and_cast_frozen(monkeypatch):
    """Checkpointing recomputes, it does not change the maths: same losses as without (fp32).
    ``cast_frozen`` stores the UNet and the ControlNet's frozen base in bf16 and still trains the
    adapter, in fp32 (bf16 autocast)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    plain, unet0, _ = _train({})
    ckpt, unet1, _ = _train({"gradient_checkpointing": True})
    assert not unet0.down_blocks[0].gradient_checkpointing and unet1.down_blocks[0].gradient_checkpointing
    assert [r["loss"] for r in ckpt.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)
    half, unet2, cn2 = _train({"memory_preset": "16gb_no_bnb"})
    assert {p.dtype for p in unet2.parameters()} == {torch.bfloat16}
    trained = [p for n, p in cn2.named_parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    frozen = [p for p in cn2.parameters() if not p.requires_grad]  # the ControlNet's base
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in half.history)
    assert [r["loss"] for r in half.history] == pytest.approx([r["loss"] for r in plain.history], rel=0.05)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ImportError, match=r"adamw8bit' needs bitsandbytes.*\[bnb\]"):
        _train({"optimizer": "adamw8bit"})


def test_unet_attention_is_sdpa():
    """diffusers' default processor for torch >= 2 is AttnProcessor2_0, which calls
    torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on GPUs)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ctrlora.models.backbone import build_tiny_backbone

    bb = build_tiny_backbone(tiny_test_config(unet_block_out_channels=(32, 32), unet_attention_heads=(2, 2)), ["upper"])
    assert {type(p) for p in bb.unet.attn_processors.values()} == {AttnProcessor2_0}
