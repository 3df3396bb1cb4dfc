"""Stable Diffusion 1.5 as one file: import an original (ldm / CompVis layout) ``.safetensors``
or ``.ckpt`` into the diffusers-layout folder the project reads (``ctrlora import-sd15``), and
the inverse (:func:`ldm_state_dict`) that writes such a file from a backbone, for tests.

The single file is one flat dict:

* ``model.diffusion_model.*`` -- the UNet;
* ``first_stage_model.*`` -- the VAE (its mid-block attention's q, k, v and proj_out are 1x1
  convolutions, diffusers' are linear layers);
* ``cond_stage_model.transformer.*`` -- the CLIP text encoder, under transformers' own names;
* and, in many files, tensors nothing here reads: the DDPM schedule buffers (``betas``,
  ``alphas_cumprod`` ...), an EMA copy of the UNet (``model_ema.*``), the text encoder's
  ``position_ids`` (a fixed range, rebuilt by the model). The import report counts them.

Names are mapped by diffusers' own single-file conversion (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``: what ``from_single_file`` runs),
with the component configs given locally, never fetched: SD 1.5's, written out in
:mod:`ctrlora.models.sizes`, or a diffusers-layout folder's (``config_dir``: ``unet/``, ``vae/``,
``text_encoder/`` and ``scheduler/`` configs). The load is strict: every tensor of the three
parts must land on a parameter of the same shape, and every parameter must be filled; anything
else stops the import, naming the file's keys. Weights are stored in fp32, as the project's
backbones are (an fp16 file doubles in size).

A checkpoint holds no tokenizer: ``tokenizer_dir`` names one (``tokenizer.json``, or
``vocab.json`` + ``merges.txt``: SD 1.5's is CLIP ViT-L/14's BPE tokenizer, the ``tokenizer/``
folder of any diffusers copy of SD 1.5). The scheduler is SD 1.5's DDPM training schedule (or
the ``config_dir``'s).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
POSITION_IDS = "text_model.embeddings.position_ids"
# the mid-block attention's projections: 1x1 convolutions in the ldm VAE, linear in diffusers'
_VAE_CONV_ATTENTION = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


# ---------------------------------------------------------------------- configs
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config not found (a --config folder holds unet/config.json, "
                                "vae/config.json, text_encoder/config.json, scheduler/scheduler_config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def component_configs(config_dir: str | Path | None, tokenizer=None) -> dict[str, dict]:
    """``{"unet", "vae", "text_encoder", "scheduler"}`` configs: a diffusers-layout folder's, or
    SD 1.5's (the text encoder's special-token ids from ``tokenizer``, as
    :func:`ctrlora.models.sizes.random_sd15_backbone` sets them)."""
    from ctrlora.models.backbone import SD15_SCHEDULER
    from ctrlora.models.sizes import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    if config_dir is not None:
        d = Path(config_dir)
        return {"unet": _read_json(d / "unet" / "config.json"), "vae": _read_json(d / "vae" / "config.json"),
                "text_encoder": _read_json(d / "text_encoder" / "config.json"),
                "scheduler": _read_json(d / "scheduler" / "scheduler_config.json")}
    ids = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                        "pad_token_id": tokenizer.pad_token_id}
    return {"unet": dict(SD15_UNET_CONFIG), "vae": dict(SD15_VAE_CONFIG), "text_encoder": {**SD15_TEXT_CONFIG, **ids},
            "scheduler": {"_class_name": "DDPMScheduler", **SD15_SCHEDULER}}


def load_tokenizer(tokenizer_dir: str | Path | None):
    """The tokenizer a single-file checkpoint lacks, from a local folder."""
    from transformers import AutoTokenizer

    hint = ("a single-file SD 1.5 checkpoint holds no tokenizer: pass --tokenizer DIR, the tokenizer/ folder of a "
            "diffusers copy of SD 1.5 (CLIP ViT-L/14's BPE tokenizer: tokenizer.json, or vocab.json + merges.txt)")
    if tokenizer_dir is None:
        raise ValueError(hint)
    d = Path(tokenizer_dir)
    if not ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())):
        raise FileNotFoundError(f"{d}: not a tokenizer folder (no tokenizer.json, nor vocab.json + merges.txt); {hint}")
    return AutoTokenizer.from_pretrained(d, local_files_only=True)


# ---------------------------------------------------------------------- the three parts
def _parts(sd: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """The file's tensors by part (keys as in the file), and the count of the others by kind."""
    parts: dict[str, dict[str, Any]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    ignored: dict[str, int] = {}
    for k, v in sd.items():
        part = ("unet" if k.startswith(UNET_PREFIX) else "vae" if k.startswith(VAE_PREFIX)
                else "text_encoder" if k.startswith(TEXT_PREFIX) else None)
        if part == "text_encoder" and k == TEXT_PREFIX + POSITION_IDS:
            part = None  # a buffer the model rebuilds (a fixed range); some files carry it damaged
        if part is None:  # counted by kind: model_ema (an EMA copy), position_ids, betas, alphas_cumprod ...
            kind = "position_ids" if k.endswith(POSITION_IDS) else k.split(".", 1)[0]
            ignored[kind] = ignored.get(kind, 0) + 1
        else:
            parts[part][k] = v
    empty = [p for p, d in parts.items() if not d]
    if empty:
        prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
        raise ValueError(f"no {', '.join(empty)} tensors (keys under {[prefixes[p] for p in empty]}): not a "
                         "Stable Diffusion 1.x single-file checkpoint")
    return parts, ignored


def _converter(part: str, config: Mapping[str, Any]) -> Callable[[dict], dict]:
    """diffusers' single-file conversion of one part (file keys -> diffusers keys)."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    if part == "unet":
        return lambda sd: convert_ldm_unet_checkpoint(sd, dict(config))
    if part == "vae":
        return lambda sd: convert_ldm_vae_checkpoint(sd, dict(config))
    return lambda sd: convert_ldm_clip_checkpoint(sd)


def name_map(part: str, config: Mapping[str, Any], keys: list[str]) -> dict[str, str]:
    """``{diffusers key: file key}``: diffusers' conversion run on 0-d index tensors, so every
    output is traced to the one input it came from (the conversion moves values, it does not
    combine them; the VAE's reshape of a 0-d tensor is a no-op)."""
    import torch

    probe = {k: torch.tensor(i) for i, k in enumerate(keys)}
    out = _converter(part, config)(probe)
    return {new: keys[int(v)] for new, v in out.items() if v is not None}


def _model(part: str, config: Mapping[str, Any]):
    """An empty (meta-device parameters) model of ``part``, from ``config``."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():
        if part == "unet":
            return UNet2DConditionModel.from_config(cfg)
        if part == "vae":
            return AutoencoderKL.from_config(cfg)
        return CLIPTextModel(CLIPTextConfig.from_dict(cfg))


def _load_part(part: str, config: Mapping[str, Any], tensors: dict[str, Any]):
    """Convert one part with diffusers' function and load it strictly into a model of ``config``;
    every mismatch is refused with the file's key names."""
    model = _model(part, config)
    want = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    names = name_map(part, config, list(tensors))
    problems = []
    unplaced = sorted(set(tensors) - set(names.values()))
    if unplaced:
        problems.append(f"keys diffusers' conversion does not place: {unplaced[:10]}")
    twice = sorted({v for v in names.values() if list(names.values()).count(v) > 1})
    if twice:
        problems.append(f"keys placed twice: {twice[:10]}")
    unknown = sorted(f"{names[k]} (-> {k})" for k in names if k not in want)
    if unknown:
        problems.append(f"keys with no {part} parameter: {unknown[:10]}")
    missing = sorted(set(want) - set(names))
    if missing:
        problems.append(f"the file lacks {len(missing)} {part} parameter(s): {missing[:10]}")
    if problems:
        raise ValueError("; ".join(problems))
    converted = _converter(part, config)(dict(tensors))
    wrong = [f"{names[k]}: {tuple(v.shape)} vs {want[k]}" for k, v in converted.items() if tuple(v.shape) != want[k]]
    if wrong:
        raise ValueError(f"{part} shape mismatch (file key: file shape vs the config's): {wrong[:10]}")
    converted = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{part}: tensors left unfilled: {left[:10]}")
    return model.eval()


def import_single_file(checkpoint: str | Path, tokenizer_dir: str | Path | None, out: str | Path,
                       config_dir: str | Path | None = None) -> dict[str, Any]:
    """Convert a single-file SD 1.x checkpoint into a diffusers-layout backbone folder ``out``
    (new or empty; written in a temporary sibling and renamed into place once complete).
    Returns the report: what was read, what was ignored, the backbone hash of ``out``."""
    import diffusers
    from diffusers import DDPMScheduler
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from ctrlora.data.files import sha256_file
    from ctrlora.models.backbone import Backbone, backbone_hash, load_backbone
    from ctrlora.models.convert import _atomic_output, read_state_dict

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty (choose a new --out or remove it)")
    tokenizer = load_tokenizer(tokenizer_dir)
    configs = component_configs(config_dir, tokenizer)
    vocab = int(configs["text_encoder"]["vocab_size"])
    if len(tokenizer) > vocab:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens, the text encoder {vocab} "
                         "embeddings (not SD 1.5's tokenizer?)")
    sd = read_state_dict(checkpoint)
    try:
        parts, ignored = _parts(sd)
        if config_dir is None:  # the built-in configs are SD 1.5's: say so when diffusers sees another model
            kind = infer_diffusers_model_type(sd)
            if kind != "v1":
                raise ValueError(f"diffusers recognises a {kind!r} checkpoint, not Stable Diffusion 1.x; pass "
                                 "--config with a diffusers-layout folder of its component configs")
        del sd
        models = {p: _load_part(p, configs[p], parts.pop(p)) for p in ("unet", "vae", "text_encoder")}
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    sched_cfg = {k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}
    sched_cls = getattr(diffusers, configs["scheduler"].get("_class_name", "DDPMScheduler"), DDPMScheduler)
    backbone = Backbone(vae=models["vae"], unet=models["unet"], text_encoder=models["text_encoder"],
                        tokenizer=tokenizer, scheduler=sched_cls.from_config(sched_cfg))
    with _atomic_output(out) as tmp:
        backbone.save(tmp)
        load_backbone(tmp)  # what every stage will do: refuse now, not there
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
            "format": checkpoint.suffix.lstrip("."), "out": str(out),
            "tensors": {p: sum(1 for _ in m.state_dict()) for p, m in models.items()},
            "ignored": ignored, "backbone_hash": backbone_hash(out)}


# ---------------------------------------------------------------------- the inverse (tests)
def _resblock(prefix: str) -> list[str]:
    from ctrlora.models.convert import _RESBLOCK

    return [f"{prefix}.{p}" for p in _RESBLOCK]


def unet_ldm_modules(config: Mapping[str, Any]) -> list[str]:
    """Every ldm module path (no prefix) an SD-layout UNet of ``config`` can have, in ldm order;
    optional parts (``skip_connection``) included, kept by the caller when the model has them."""
    from ctrlora.models.convert import _transformer_modules

    n, down, up = int(config["layers_per_block"]), list(config["down_block_types"]), list(config["up_block_types"])
    depth = config.get("transformer_layers_per_block", 1)
    depth = int(depth) if isinstance(depth, int) else max(int(d) for d in depth)
    mods, i = ["time_embed.0", "time_embed.2", "input_blocks.0.0"], 0
    for level, kind in enumerate(down):
        for _ in range(n):
            i += 1
            mods += _resblock(f"input_blocks.{i}.0")
            if "CrossAttn" in kind:
                mods += _transformer_modules(f"input_blocks.{i}.1", depth)
        if level < len(down) - 1:
            i += 1
            mods.append(f"input_blocks.{i}.0.op")
    mods += _resblock("middle_block.0") + _transformer_modules("middle_block.1", depth) + _resblock("middle_block.2")
    i = -1
    for level, kind in enumerate(up):
        for j in range(n + 1):
            i += 1
            mods += _resblock(f"output_blocks.{i}.0")
            attn = "CrossAttn" in kind
            if attn:
                mods += _transformer_modules(f"output_blocks.{i}.1", depth)
            if j == n and level < len(up) - 1:
                mods.append(f"output_blocks.{i}.{2 if attn else 1}.conv")
    return mods + ["out.0", "out.2"]


def vae_ldm_modules(config: Mapping[str, Any]) -> list[str]:
    """Every ldm module path (no prefix) of an SD-layout VAE of ``config``, optional ones included."""
    levels, n = len(config["block_out_channels"]), int(config["layers_per_block"])
    res = ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")

    def mid(side: str) -> list[str]:
        return ([f"{side}.mid.block_1.{p}" for p in res] + [f"{side}.mid.attn_1.{p}" for p in
                                                             ("norm", "q", "k", "v", "proj_out")]
                + [f"{side}.mid.block_2.{p}" for p in res])

    mods = ["encoder.conv_in"]
    for i in range(levels):
        mods += [f"encoder.down.{i}.block.{j}.{p}" for j in range(n) for p in res]
        if i < levels - 1:
            mods.append(f"encoder.down.{i}.downsample.conv")
    mods += mid("encoder") + ["encoder.norm_out", "encoder.conv_out", "decoder.conv_in"] + mid("decoder")
    for i in range(levels):
        mods += [f"decoder.up.{i}.block.{j}.{p}" for j in range(n + 1) for p in res]
        if i > 0:
            mods.append(f"decoder.up.{i}.upsample.conv")
    return mods + ["decoder.norm_out", "decoder.conv_out", "quant_conv", "post_quant_conv"]


def _inverse(part: str, config: Mapping[str, Any], prefix: str, candidates: list[str],
             weights: Mapping[str, Any]) -> dict[str, Any]:
    """``weights`` (diffusers names) under their file names: the candidate file keys mapped by
    diffusers' conversion (:func:`name_map`) and inverted; every weight must get exactly one."""
    forward = name_map(part, config, [prefix + c for c in candidates])
    back = {new: old for new, old in forward.items() if new in weights}
    missing = sorted(set(weights) - set(back))
    if missing or len(set(back.values())) != len(back):
        raise ValueError(f"{part}: no single-file name for {missing[:10]} (or a name used twice)")
    out = {}
    for new, old in back.items():
        t = weights[new]
        if part == "vae" and old.endswith(_VAE_CONV_ATTENTION) and ".mid.attn_1." in old:
            t = t[:, :, None, None]  # the ldm VAE's 1x1 convolution
        out[old] = t.contiguous()
    return out


def ldm_state_dict(backbone) -> dict[str, Any]:
    """The single-file (ldm layout) dict of a :class:`~ctrlora.models.backbone.Backbone` of SD
    layout: UNet, VAE and text encoder under their ldm prefixes, plus the DDPM schedule buffers
    (``betas``, ``alphas_cumprod``) and the text encoder's ``position_ids`` as the original files
    carry them. :func:`import_single_file` reads it back to the same tensors."""
    import torch

    unet_cfg, vae_cfg = dict(backbone.unet.config), dict(backbone.vae.config)
    unet_keys = [f"{m}.{p}" for m in unet_ldm_modules(unet_cfg) for p in ("weight", "bias")]
    vae_keys = [f"{m}.{p}" for m in vae_ldm_modules(vae_cfg) for p in ("weight", "bias")]
    sd = _inverse("unet", unet_cfg, UNET_PREFIX, unet_keys, backbone.unet.state_dict())
    sd.update(_inverse("vae", vae_cfg, VAE_PREFIX, vae_keys, backbone.vae.state_dict()))
    text = backbone.text_encoder.state_dict()
    sd.update({TEXT_PREFIX + k: v.contiguous() for k, v in text.items()})
    positions = backbone.text_encoder.config.max_position_embeddings
    sd[TEXT_PREFIX + POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]
    sched = backbone.scheduler
    sd["betas"], sd["alphas_cumprod"] = sched.betas.clone(), sched.alphas_cumprod.clone()
    return sd


# ---------------------------------------------------------------------- CLI: ctrlora import-sd15
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="single-file SD 1.5 checkpoint (.safetensors, or .ckpt read "
                                                      "with torch.load(weights_only=True))")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder (tokenizer.json, or vocab.json + merges.txt); a checkpoint holds none")
    parser.add_argument("--out", type=Path, required=True,
                        help="new or empty folder for the diffusers-layout backbone (point backbone.sd15_path here)")
    parser.add_argument("--config", type=Path, default=None,
                        help="diffusers-layout folder whose unet/vae/text_encoder/scheduler configs to use "
                             "(default: SD 1.5's, built in)")


def run(args) -> int:
    report = import_single_file(args.checkpoint, args.tokenizer, args.out, args.config)
    print(json.dumps(report, indent=1))
    return 0
