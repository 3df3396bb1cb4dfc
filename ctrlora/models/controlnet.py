"""The CtrLoRA Base ControlNet as a diffusers model.

The network is the encoder half of a Stable-Diffusion-style UNet (time embedding, down blocks,
mid block) followed by one 1x1 "zero conv" per skip connection and one for the mid block -- the
same submodule names as diffusers' ``ControlNetModel`` (``conv_in``, ``time_proj``,
``time_embedding``, ``down_blocks``, ``controlnet_down_blocks``, ``mid_block``,
``controlnet_mid_block``), so diffusers' ldm -> diffusers ControlNet key mapping applies to it.

Two ways to embed the condition (config field ``condition_embedding``):

``"vae"`` (CtrLoRA, the default)
    The condition image in [0, 1] is encoded by the frozen SD VAE; a *sample* of the posterior
    times ``scaling_factor`` goes straight into ``conv_in``. The noisy latent is not an input.
    There is no hint CNN.
``"cnn"`` (original ControlNet, kept for the ablation)
    ``conv_in(noisy latent) + ControlNetConditioningEmbedding(condition image)``.

The forward returns the residuals for the UNet's skip connections (12 at SD scale) and its mid
block, each multiplied by ``conditioning_scale`` (a float, or one value per sample).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding, ControlNetOutput
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block

CONDITION_EMBEDDINGS = ("vae", "cnn")


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def default_hint_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Hint-CNN widths for the ``cnn`` ablation: diffusers' SD widths, one stride-2 stage per
    factor of 2 of the VAE's downscaling (8 -> (16, 32, 96, 256), 4 -> (16, 32, 96))."""
    n_down = int(round(math.log2(vae_scale_factor)))
    if 2**n_down != vae_scale_factor or not 1 <= n_down <= 3:
        raise ValueError(f"vae_scale_factor must be 2, 4 or 8, got {vae_scale_factor}")
    return (16, 32, 96, 256)[: n_down + 1]


def _per_sample(scale: float | torch.Tensor, like: torch.Tensor, batch: int) -> float | torch.Tensor:
    """A float scale as is; a tensor of ``batch`` per-sample scales shaped to broadcast over
    ``like`` [B, C, h, w]."""
    if not (torch.is_tensor(scale) and scale.ndim > 0):
        return scale
    scale = scale.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)
    if scale.shape[0] != batch:
        raise ValueError(f"conditioning_scale has {scale.shape[0]} values for a batch of {batch}")
    return scale


def _sd_transformer_layers(c) -> int:
    """Refuse UNet configs the ControlNet cannot mirror (anything beyond SD 1.5's shape); return
    its transformer layers per block (one number for every level)."""
    if c.get("class_embed_type") or c.get("addition_embed_type") or c.get("encoder_hid_dim_type"):
        raise ValueError("only SD-1.5-style UNets (no class / addition embeddings) are supported")
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported mid_block_type {c.mid_block_type!r}")
    if c.get("num_attention_heads") is not None:
        raise ValueError("UNet configs with num_attention_heads are not supported (SD 1.5 uses attention_head_dim)")
    tlpb = c.get("transformer_layers_per_block", 1)
    if not isinstance(tlpb, int):
        if len(set(tlpb)) != 1:
            raise ValueError("per-level transformer_layers_per_block is not supported")
        tlpb = tlpb[0]
    return tlpb


class CtrLoRAControlNet(ModelMixin, ConfigMixin):
    """Base ControlNet of CtrLoRA (see module docstring)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        condition_embedding: str = "vae",
        in_channels: int = 4,
        conditioning_channels: int = 4,
        conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int = 1,
        attention_head_dim: int | Sequence[int] = 8,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
    ):
        super().__init__()
        if condition_embedding not in CONDITION_EMBEDDINGS:
            raise ValueError(f"condition_embedding must be one of {CONDITION_EMBEDDINGS}, got {condition_embedding!r}")
        if len(block_out_channels) != len(down_block_types):
            raise ValueError("block_out_channels and down_block_types must have the same length")
        # diffusers' UNet2DConditionModel calls the number of heads `attention_head_dim` (a
        # historical misnomer kept for SD configs); the same convention is used here.
        heads = (
            (attention_head_dim,) * len(down_block_types)
            if isinstance(attention_head_dim, int)
            else tuple(attention_head_dim)
        )
        ch0 = block_out_channels[0]
        time_embed_dim = ch0 * 4

        # In "vae" mode conv_in sees the condition latent; in "cnn" mode it sees the noisy latent.
        conv_in_channels = conditioning_channels if condition_embedding == "vae" else in_channels
        self.conv_in = nn.Conv2d(conv_in_channels, ch0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(ch0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(ch0, time_embed_dim, act_fn=act_fn)
        if condition_embedding == "cnn":
            self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
                conditioning_embedding_channels=ch0,
                conditioning_channels=conditioning_channels,
                block_out_channels=tuple(conditioning_embedding_out_channels),
            )
        else:
            self.controlnet_cond_embedding = None

        self.down_blocks, self.controlnet_down_blocks = self._down_path(heads, time_embed_dim)
        self.mid_block = self._mid_block(heads[-1], time_embed_dim)
        self.controlnet_mid_block = _zero_conv(block_out_channels[-1])

    def _down_path(self, heads: Sequence[int], time_embed_dim: int) -> tuple[nn.ModuleList, nn.ModuleList]:
        """The UNet's down blocks and one zero conv per skip connection they make (the first for
        ``conv_in``'s output), built in the order that fixes their random initialisation."""
        c = self.config
        ch0 = c.block_out_channels[0]
        down_blocks = nn.ModuleList()
        zero_convs = nn.ModuleList([_zero_conv(ch0)])
        out_ch = ch0
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            last = i == len(c.block_out_channels) - 1
            down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=c.layers_per_block,
                    transformer_layers_per_block=c.transformer_layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=time_embed_dim,
                    add_downsample=not last,
                    resnet_eps=c.norm_eps,
                    resnet_act_fn=c.act_fn,
                    resnet_groups=c.norm_num_groups,
                    cross_attention_dim=c.cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=out_ch // heads[i],
                    downsample_padding=c.downsample_padding,
                    use_linear_projection=c.use_linear_projection,
                    only_cross_attention=c.only_cross_attention,
                    upcast_attention=c.upcast_attention,
                    resnet_time_scale_shift=c.resnet_time_scale_shift,
                )
            )
            for _ in range(c.layers_per_block + (0 if last else 1)):
                zero_convs.append(_zero_conv(out_ch))
        return down_blocks, zero_convs

    def _mid_block(self, heads: int, time_embed_dim: int) -> UNetMidBlock2DCrossAttn:
        c = self.config
        return UNetMidBlock2DCrossAttn(
            transformer_layers_per_block=c.transformer_layers_per_block,
            in_channels=c.block_out_channels[-1],
            temb_channels=time_embed_dim,
            resnet_eps=c.norm_eps,
            resnet_act_fn=c.act_fn,
            output_scale_factor=c.mid_block_scale_factor,
            resnet_time_scale_shift=c.resnet_time_scale_shift,
            cross_attention_dim=c.cross_attention_dim,
            num_attention_heads=heads,
            resnet_groups=c.norm_num_groups,
            use_linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet(
        cls,
        unet,
        condition_embedding: str = "vae",
        copy_weights: bool = True,
        conditioning_channels: int | None = None,
        vae_scale_factor: int = 8,
        conditioning_embedding_out_channels: Sequence[int] | None = None,
    ) -> "CtrLoRAControlNet":
        """Build the ControlNet from a ``UNet2DConditionModel`` (encoder half, optionally with its
        weights). ``conditioning_channels`` defaults to the latent channels for ``"vae"`` and 3
        (RGB) for ``"cnn"``; the hint CNN of ``"cnn"`` downsamples by ``vae_scale_factor``."""
        c = unet.config
        tlpb = _sd_transformer_layers(c)
        if conditioning_channels is None:
            conditioning_channels = c.in_channels if condition_embedding == "vae" else 3
        if conditioning_embedding_out_channels is None:
            conditioning_embedding_out_channels = default_hint_channels(vae_scale_factor)
        ahd = c.attention_head_dim
        model = cls(
            condition_embedding=condition_embedding,
            in_channels=c.in_channels,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
            down_block_types=tuple(c.down_block_types),
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            downsample_padding=c.downsample_padding,
            mid_block_scale_factor=c.mid_block_scale_factor,
            act_fn=c.act_fn,
            norm_num_groups=c.norm_num_groups,
            norm_eps=c.norm_eps,
            cross_attention_dim=c.cross_attention_dim,
            transformer_layers_per_block=tlpb,
            attention_head_dim=ahd if isinstance(ahd, int) else tuple(ahd),
            use_linear_projection=c.use_linear_projection,
            only_cross_attention=bool(c.only_cross_attention),
            upcast_attention=c.upcast_attention,
            resnet_time_scale_shift=c.resnet_time_scale_shift,
        )
        if model.dtype != unet.dtype:
            model.to(dtype=unet.dtype)
        if copy_weights:
            model.time_embedding.load_state_dict(unet.time_embedding.state_dict())
            model.down_blocks.load_state_dict(unet.down_blocks.state_dict())
            model.mid_block.load_state_dict(unet.mid_block.state_dict())
            # conv_in: in "cnn" mode it reads the same noisy latent as the UNet's; in "vae" mode
            # it reads a latent of the same VAE, so the UNet's conv_in is the natural start too.
            if model.conv_in.weight.shape == unet.conv_in.weight.shape:
                model.conv_in.load_state_dict(unet.conv_in.state_dict())
        return model

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, **kwargs):
        """diffusers ``save_pretrained`` (safetensors) of the **base only**: adapters injected with
        :mod:`ctrlora.models.adapters` are left out (save those with ``save_adapter``)."""
        from ctrlora.models.adapters import base_state_dict, has_adapters

        kwargs["safe_serialization"] = True
        if not has_adapters(self):
            return super().save_pretrained(save_directory, **kwargs)
        from accelerate import init_empty_weights

        with init_empty_weights():
            clean = type(self).from_config(self.config)
        clean.load_state_dict(base_state_dict(self), strict=True, assign=True)
        return clean.save_pretrained(save_directory, **kwargs)

    # ------------------------------------------------------------------ forward
    def _time_embedding(self, timestep, batch: int, x: torch.Tensor) -> torch.Tensor:
        """Timestep(s) (scalar or [B]) -> the time embedding [B, 4 * ch0]; the sinusoid is
        computed in float32 ([cos | sin], as ldm) and cast to the input's dtype."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=x.device)
        timestep = timestep.to(x.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        return self.time_embedding(self.time_proj(timestep).to(dtype=x.dtype))

    @property
    def num_residuals(self) -> int:
        return len(self.controlnet_down_blocks) + 1

    def forward(
        self,
        controlnet_cond: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        sample: torch.Tensor | None = None,
        conditioning_scale: float | torch.Tensor = 1.0,
        adapter_names: Sequence[str] | None = None,
        return_dict: bool = True,
    ):
        """Run the ControlNet.

        Args:
            controlnet_cond: ``"vae"``: condition latent [B, C_lat, h, w] (posterior sample times
                the VAE scaling factor, see :func:`ctrlora.models.latents.encode_condition`);
                ``"cnn"``: condition image [B, 3, H, W] in [0, 1].
            timestep: scalar or [B] diffusion timesteps.
            encoder_hidden_states: text context [B, L, D].
            sample: the noisy latent; required for ``"cnn"``, ignored for ``"vae"``.
            conditioning_scale: float, or a tensor of B per-sample scales.
            adapter_names: optional per-sample adapter names (mixed batch, see
                :func:`ctrlora.models.adapters.mixed_adapters`); ``"__base__"`` = no adapter.
        Returns:
            ``ControlNetOutput(down_block_res_samples, mid_block_res_sample)`` (or a tuple).
        """
        if adapter_names is not None:
            from ctrlora.models.adapters import mixed_adapters

            with mixed_adapters(self, adapter_names):
                return self.forward(
                    controlnet_cond, timestep, encoder_hidden_states, sample, conditioning_scale, None, return_dict
                )

        batch = controlnet_cond.shape[0]
        x = controlnet_cond
        if self.config.condition_embedding == "cnn":
            if sample is None:
                raise ValueError("condition_embedding='cnn' needs the noisy latent `sample`")
            x = sample
        emb = self._time_embedding(timestep, batch, x)
        h = self.conv_in(x)
        if self.controlnet_cond_embedding is not None:
            h = h + self.controlnet_cond_embedding(controlnet_cond)

        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)

        down = [zc(s) for s, zc in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(h)

        scale = _per_sample(conditioning_scale, mid, batch)
        down = [d * scale for d in down]
        mid = mid * scale
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
