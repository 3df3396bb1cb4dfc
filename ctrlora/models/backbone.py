"""The latent-diffusion backbone: a local diffusers-layout Stable Diffusion 1.5 directory, or the
tiny dental preset in the same layout.

Layout (both scales)::

    <dir>/vae/            config.json + diffusion_pytorch_model.safetensors   (AutoencoderKL)
    <dir>/unet/           config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
    <dir>/text_encoder/   config.json + model.safetensors                     (CLIPTextModel)
    <dir>/tokenizer/      tokenizer.json or vocab.json + merges.txt           (AutoTokenizer)
    <dir>/scheduler/      scheduler_config.json

Everything is read with ``local_files_only=True`` and safetensors only; nothing reaches a hub.

Tiny preset (sizes: ``params.yaml`` ``backbone.tiny``, read by :func:`tiny_backbone_config`):

* VAE: one ``DownEncoderBlock2D`` per entry of ``vae_block_out_channels`` (a downsampling
  between each), 4 latent channels.
* UNet: one level per entry of ``unet_block_out_channels``, SD's block pattern
  (CrossAttnDown x (levels - 1) + Down / Up + CrossAttnUp x (levels - 1), cross-attention mid
  block), ``unet_attention_heads`` heads per level.
* Text encoder: CLIPTextModel, hidden size = the UNet's cross-attention dim, 2 layers, 4 heads,
  32 positions.
* Tokenizer: word level over the given vocabulary (+ ``<|startoftext|>``, ``<|endoftext|>``,
  ``<|pad|>``, ``<|unk|>``) and common punctuation, lower-cased, split on whitespace and
  punctuation.
* Scheduler: DDPM with SD 1.5's schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from ctrlora.data.files import update_from_file

PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
PUNCTUATION = (",", ".", ";", ":", "-", "(", ")", "!", "?", "/")
SPECIAL_TOKENS = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>", "unk": "<|unk|>"}


@dataclass
class Backbone:
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def save(self, path: str | Path) -> Path:
        """Write the diffusers SD layout (safetensors) to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(path / "vae", safe_serialization=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        return path

    def to(self, device=None, dtype=None) -> "Backbone":
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self


# ---------------------------------------------------------------------- loading
def _missing_parts(path: Path) -> list[str]:
    missing = []
    if not path.is_dir():
        return [f"{path} (directory does not exist)"]
    for sub, config in (("vae", "config.json"), ("unet", "config.json"), ("text_encoder", "config.json"),
                        ("scheduler", "scheduler_config.json")):
        if not (path / sub / config).is_file():
            missing.append(f"{sub}/{config}")
    for sub in ("vae", "unet"):
        if not list((path / sub).glob("diffusion_pytorch_model*.safetensors")):
            missing.append(f"{sub}/diffusion_pytorch_model.safetensors")
    if not list((path / "text_encoder").glob("model*.safetensors")):
        missing.append("text_encoder/model.safetensors")
    tok = path / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        missing.append("tokenizer/tokenizer.json (or vocab.json + merges.txt)")
    return missing


def load_backbone(path: str | Path, torch_dtype=None) -> Backbone:
    """Load a local diffusers-layout SD 1.5 (or tiny preset) directory. Raises
    ``FileNotFoundError`` listing every missing part."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(path)
    missing = _missing_parts(path)
    if missing:
        raise FileNotFoundError(f"incomplete backbone directory {path}: missing " + ", ".join(missing))
    common: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch_dtype, **common)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype, **common)
    te_kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **te_kwargs, **common)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler"), None) or diffusers.DDPMScheduler
    scheduler = sched_cls.from_pretrained(path / "scheduler", local_files_only=True)
    for m in (vae, unet, text_encoder):
        m.eval()
    return Backbone(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def backbone_hash(path: str | Path) -> str:
    """sha256 over the relative paths and contents of every file of the five parts (weights,
    configs, tokenizer files); independent of anything else in the directory."""
    path = Path(path)
    missing = _missing_parts(path)
    if missing:
        raise FileNotFoundError(f"incomplete backbone directory {path}: missing " + ", ".join(missing))
    h = hashlib.sha256()
    for part in PARTS:
        for f in sorted(p for p in (path / part).rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            update_from_file(h, f)
            h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------- tiny preset
# Stable Diffusion 1.5's DDPM training schedule (epsilon prediction).
SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)


@dataclass(kw_only=True)
class TinyBackboneConfig:
    """Sizes of the tiny dental backbone.

    The sizes that ``params.yaml`` ``backbone.tiny`` states have no default here: that section is
    their one statement, and :meth:`from_params` / :func:`tiny_backbone_config` build the preset
    from it. The remaining fields are fixed choices of the preset (a params section may still
    set any of them)."""

    image_size: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_attention_heads: tuple[int, ...]
    norm_num_groups: int
    cross_attention_dim: int
    text_hidden_size: int
    scheduler: dict  # DDPMScheduler kwargs
    latent_channels: int = 4
    vae_scaling_factor: float = 0.18215  # placeholder; the backbone pretraining re-estimates it
    text_intermediate_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.unet_block_out_channels) != len(self.unet_attention_heads):
            raise ValueError("unet_block_out_channels and unet_attention_heads must have the same length")
        if self.image_size % self.vae_scale_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by the VAE factor {self.vae_scale_factor}")
        if self.text_hidden_size != self.cross_attention_dim:
            raise ValueError("text_hidden_size must equal cross_attention_dim (the UNet reads the text states)")

    @classmethod
    def from_params(cls, section: Mapping[str, Any], **overrides: Any) -> "TinyBackboneConfig":
        """The config from a params section (``backbone.tiny``; YAML lists become tuples),
        with ``overrides`` on top. Unknown or missing keys are refused by name."""
        values = {**section, **overrides}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown tiny backbone settings {unknown}; known: {sorted(names)}")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                         and f.name not in values)
        if missing:
            raise ValueError(f"the tiny backbone settings lack {missing} (params.yaml backbone.tiny states them)")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**kwargs)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_backbone_config(params_file: str | Path | None = None, **overrides: Any) -> TinyBackboneConfig:
    """The tiny preset as the project's ``params.yaml`` ``backbone.tiny`` configures it (the file
    found by :func:`ctrlora.params.find_params_file` unless given)."""
    from ctrlora.params import params_section

    return TinyBackboneConfig.from_params(params_section("backbone.tiny", params_file), **overrides)


def build_tokenizer(vocabulary: Sequence[str], max_length: int = 32):
    """Word-level tokenizer (``tokenizers``) over ``vocabulary`` (lower-cased words, duplicates
    dropped), wrapped as a ``PreTrainedTokenizerFast`` that ``AutoTokenizer`` reloads."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words: list[str] = []
    seen = set(SPECIAL_TOKENS.values())
    for w in list(vocabulary) + list(PUNCTUATION):
        w = w.strip().lower()
        if w and w not in seen:
            seen.add(w)
            words.append(w)
    specials = [SPECIAL_TOKENS[k] for k in ("bos", "eos", "pad", "unk")]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos, eos_token=eos, pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=max_length, padding_side="right",
    )


def tiny_vae(cfg: TinyBackboneConfig):
    """The tiny preset's ``AutoencoderKL`` (random weights from torch's RNG)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_block_out_channels),
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size,
        scaling_factor=cfg.vae_scaling_factor,
    )


def tiny_unet(cfg: TinyBackboneConfig):
    """The tiny preset's ``UNet2DConditionModel``: SD's block pattern (CrossAttnDown x (levels-1)
    + Down / Up + CrossAttnUp x (levels-1), cross-attention mid block)."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.unet_block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // cfg.vae_scale_factor,
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.unet_block_out_channels),
        layers_per_block=cfg.unet_layers_per_block,
        attention_head_dim=tuple(cfg.unet_attention_heads),  # = number of heads (diffusers naming)
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
        flip_sin_to_cos=True, freq_shift=0,
    )


def tiny_text_encoder(cfg: TinyBackboneConfig, tokenizer):
    """The tiny preset's ``CLIPTextModel`` over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.cross_attention_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_tiny_backbone(cfg: TinyBackboneConfig, vocabulary: Sequence[str]) -> Backbone:
    """Randomly initialised tiny backbone (seeded by ``cfg.seed``); pretrain it before use."""
    import torch
    from diffusers import DDPMScheduler

    tokenizer = build_tokenizer(vocabulary, cfg.max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = tiny_vae(cfg)
        unet = tiny_unet(cfg)
        text_encoder = tiny_text_encoder(cfg, tokenizer)
    scheduler = DDPMScheduler(**cfg.scheduler)
    for m in (vae, unet, text_encoder):
        m.eval()
    return Backbone(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
