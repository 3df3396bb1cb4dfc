"""Import the published (ldm-format) CtrLoRA checkpoints (``ctrlora convert``) and write this
project's base and adapter folders in that layout (``ctrlora export``).

Published files are flat fp32 dicts with ldm names under ``control_model.``:

* **base file**: the base ControlNet (no ``input_hint_block``), its zero convs and transformer
  norms, plus one *stale* LoRA set (``*.lora_layer.*``) left over from pretraining. The stale
  set is discarded; everything else becomes a :class:`CtrLoRAControlNet` ``save_pretrained`` dir.
* **adapter file** (246 tensors at SD scale): LoRA ``<linear>.lora_layer.down.weight`` [r, in]
  (= peft ``lora_A``) and ``.up.weight`` [out, r] (= ``lora_B``), the 13 zero convs and the 28
  transformer norms. It becomes an adapter directory (see :mod:`ctrlora.models.adapters`).

The ldm -> diffusers name mapping is diffusers' own ``convert_controlnet_checkpoint``. It is run
on *names* only (every value is the key itself), which yields an exact, checkable key map: each
input key must land on exactly one parameter of the model and every parameter must be covered,
otherwise the conversion stops and names the offending keys. LoRA tensors are mapped through the
name of the ``nn.Linear`` they belong to.

Export runs the same map backwards: :func:`ldm_module_names` lists the ldm modules a model of a
given config has (the ldm encoder layout is regular), :func:`published_names` maps them with
:func:`ldm_to_diffusers_names` and inverts the result, checked so that every tensor of the model
gets exactly one published name; :func:`export_base` and :func:`export_adapter` build the dicts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from ctrlora.data.files import sha256_file

LDM_PREFIX = "control_model."
LORA_DOWN, LORA_UP = ".lora_layer.down.weight", ".lora_layer.up.weight"


# ---------------------------------------------------------------------- reading files
def check_safetensors(path: str | Path) -> None:
    """Refuse (``ValueError`` naming the file) a ``.safetensors`` file whose header is unreadable
    or whose tensors run past its end (a truncated download); reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # SafetensorError (header, truncation) or OSError
        raise ValueError(f"{path}: not a complete safetensors file ({exc})") from None


def _load_pickle(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with its failures told in one line. A file that asks for
    anything beyond tensors and plain containers is refused; torch's advice to retry with
    ``weights_only=False`` (which would run the file's code) is deliberately not passed on."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise ValueError(f"{path}: refused: the pickle holds objects other than tensors{what}; only weights "
                         f"are read from pickles (save the checkpoint as .safetensors)") from None
    except (RuntimeError, EOFError, KeyError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a readable torch checkpoint ({first.split('. ')[0]})") from None


def read_state_dict(path: str | Path) -> dict:
    """Read a flat ``name -> tensor`` dict from ``.safetensors`` or a pickle (``.ckpt``/``.pt``/
    ``.pth``, read with ``torch.load(weights_only=True)`` only). A ``state_dict`` wrapper is
    unwrapped. Every failure is a ``FileNotFoundError`` / ``ValueError`` naming the file."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        try:
            sd = load_file(str(path))
        except Exception as exc:  # a header that passed but data that does not decode
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    elif path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        sd = _load_pickle(path)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    else:
        raise ValueError(f"{path}: unsupported checkpoint format {path.suffix!r} (use .safetensors or .ckpt)")
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not a flat name -> tensor dict")
    return dict(sd)


def is_adapter_key(key: str) -> bool:
    """The reference's rule: a key belongs to the adapter iff it contains one of these."""
    return any(s in key for s in ("lora_layer", "zero_convs", "middle_block_out", "norm"))


# ---------------------------------------------------------------------- config mapping
def controlnet_config_from_ldm(kw: Mapping[str, Any]) -> dict:
    """ldm ``ControlNet`` constructor kwargs -> :class:`CtrLoRAControlNet` config (vae mode)."""
    for key, ok in (("use_spatial_transformer", True), ("legacy", False)):
        if kw.get(key, ok) != ok:
            raise ValueError(f"unsupported ldm ControlNet setting {key}={kw.get(key)!r}")
    if kw.get("use_scale_shift_norm") or kw.get("resblock_updown"):
        raise ValueError("use_scale_shift_norm / resblock_updown are not supported")
    mc, mult = kw["model_channels"], list(kw["channel_mult"])
    channels = [mc * m for m in mult]
    # attention_resolutions are downsampling factors (1 = first level)
    types = [
        "CrossAttnDownBlock2D" if 2**i in kw["attention_resolutions"] else "DownBlock2D" for i in range(len(mult))
    ]
    num_heads, head_ch = kw.get("num_heads", -1), kw.get("num_head_channels", -1)
    heads = num_heads if num_heads != -1 else tuple(c // head_ch for c in channels)
    depth = kw.get("transformer_depth", 1)
    if not isinstance(depth, int):
        raise ValueError("per-level transformer_depth is not supported")
    return dict(
        condition_embedding="vae",
        in_channels=kw["in_channels"],
        conditioning_channels=kw["in_channels"],
        down_block_types=tuple(types),
        block_out_channels=tuple(channels),
        layers_per_block=kw["num_res_blocks"],
        cross_attention_dim=kw["context_dim"],
        transformer_layers_per_block=depth,
        attention_head_dim=heads,
        use_linear_projection=bool(kw.get("use_linear_in_transformer", False)),
    )


# ---------------------------------------------------------------------- key mapping
def _strip_prefix(keys) -> list[str]:
    out = []
    for k in keys:
        if not k.startswith(LDM_PREFIX):
            raise ValueError(f"unknown key {k!r}: every key must start with {LDM_PREFIX!r}")
        out.append(k[len(LDM_PREFIX):])
    return out


def ldm_to_diffusers_names(ldm_keys, layers_per_block: int) -> dict[str, str]:
    """Map ldm ControlNet parameter names (without ``control_model.``) to diffusers names using
    diffusers' ``convert_controlnet_checkpoint`` on names. Keys it does not place are absent from
    the result (the caller reports them)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    ldm_keys = list(ldm_keys)
    # diffusers counts input blocks by the distinct `input_blocks.<i>` prefixes present; a partial
    # file (an adapter has nothing in blocks 0, 3, 6, 9) would be miscounted, so every block index
    # up to the last one (also known from the zero convs) gets a placeholder name, dropped below.
    idx = [int(m.group(2)) for k in ldm_keys if (m := re.match(r"(input_blocks|zero_convs)\.(\d+)\.", k))]
    present = {int(k.split(".")[1]) for k in ldm_keys if k.startswith("input_blocks.")}
    fillers = [f"input_blocks.{i}.placeholder" for i in range(max(idx, default=-1) + 1) if i not in present]
    probe = {k: k for k in ldm_keys + fillers}
    # diffusers takes a dict that holds `time_embed.0.weight` as already stripped of the prefix;
    # without it (adapter-only files) it looks for the prefix itself, so give it the prefix.
    if "time_embed.0.weight" not in probe:
        probe = {LDM_PREFIX + k: LDM_PREFIX + k for k in probe}
    converted = convert_controlnet_checkpoint(probe, {"layers_per_block": layers_per_block})
    mapping: dict[str, str] = {}
    for new, old in converted.items():
        if old is None or old.endswith(".placeholder"):  # .get() of an absent key, or a filler
            continue
        old = old[len(LDM_PREFIX):] if old.startswith(LDM_PREFIX) else old
        if old in mapping:
            raise ValueError(f"key {old!r} maps to two names: {mapping[old]!r} and {new!r}")
        mapping[old] = new
    return mapping


def convert_ldm_state_dict(
    sd: Mapping[str, Any],
    layers_per_block: int,
    expected: Mapping[str, tuple] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert a published-layout dict to diffusers names.

    Returns ``(weights, lora)``: ``weights`` maps diffusers parameter names (``conv_in.weight``,
    ``controlnet_down_blocks.0.weight`` ...) to tensors; ``lora`` maps
    ``<diffusers linear>.lora_A.weight`` / ``.lora_B.weight`` to tensors. If ``expected``
    (name -> shape of the model's parameters) is given, names outside it and shape mismatches
    are refused.
    """
    keys = _strip_prefix(sd.keys())
    lora_keys = [k for k in keys if "lora_layer" in k]
    plain = [k for k in keys if "lora_layer" not in k]
    bad_lora = [k for k in lora_keys if not (k.endswith(LORA_DOWN) or k.endswith(LORA_UP))]
    if bad_lora:
        raise ValueError(f"unknown LoRA keys: {bad_lora[:10]}")
    # LoRA tensors go where their Linear's weight goes
    linear_of = {k: k.rsplit(".lora_layer.", 1)[0] + ".weight" for k in lora_keys}
    probe_keys = sorted(set(plain) | set(linear_of.values()))
    names = ldm_to_diffusers_names(probe_keys, layers_per_block)
    unmapped = sorted(k for k in plain if k not in names)
    unmapped += sorted(k for k in lora_keys if linear_of[k] not in names)
    if unmapped:
        raise ValueError(f"unknown keys (no diffusers ControlNet counterpart): {unmapped[:20]}")

    weights = {names[k]: sd[LDM_PREFIX + k] for k in plain}
    lora = {}
    for k in lora_keys:
        module = names[linear_of[k]][: -len(".weight")]
        lora[module + (".lora_A.weight" if k.endswith(LORA_DOWN) else ".lora_B.weight")] = sd[LDM_PREFIX + k]
    if expected is not None:
        source = {names[k]: LDM_PREFIX + k for k in plain}
        unknown = sorted(f"{source[n]} (-> {n})" for n in weights if n not in expected)
        if unknown:
            raise ValueError(f"unknown keys (no such parameter in the model): {unknown[:20]}")
        wrong = [f"{source[n]} (-> {n}): {tuple(t.shape)} vs {tuple(expected[n])}" for n, t in weights.items()
                 if tuple(t.shape) != tuple(expected[n])]
        if wrong:
            raise ValueError(f"shape mismatch: {wrong[:20]}")
    return weights, lora


def lora_pairs(lora: Mapping[str, Any]) -> dict[str, tuple]:
    """``{module: (lora_A weight, lora_B weight)}`` of converted LoRA tensors (``lora`` as the
    second value :func:`convert_ldm_state_dict` returns); a module lacking either is refused."""
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    missing = [m for m in mods if m + ".lora_A.weight" not in lora or m + ".lora_B.weight" not in lora]
    if missing:
        raise ValueError(f"LoRA layers without both down and up: {missing[:10]}")
    return {m: (lora[m + ".lora_A.weight"], lora[m + ".lora_B.weight"]) for m in mods}


def convert_base(sd: Mapping[str, Any], model) -> tuple[dict, list[str]]:
    """Published base file -> ``model`` state dict (loaded in place, strictly). Returns
    ``(state_dict, discarded_keys)``; the discarded keys are the stale LoRA set."""
    from ctrlora.models.adapters import base_state_dict

    expected = {n: tuple(t.shape) for n, t in base_state_dict(model).items()}
    stale = sorted(k for k in sd if "lora_layer" in k)
    base = {k: v for k, v in sd.items() if "lora_layer" not in k}
    hint = sorted(k for k in base if ".input_hint_block." in k or k.startswith(LDM_PREFIX + "input_hint_block"))
    if hint and model.config.condition_embedding == "vae":
        raise ValueError(f"base file has a hint CNN (not a CtrLoRA base): {hint[:4]}")
    weights, _ = convert_ldm_state_dict(base, model.config.layers_per_block, expected)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"base file lacks parameters of the model: {missing[:20]}")
    return weights, stale


def convert_adapter(sd: Mapping[str, Any], model) -> tuple[dict, int]:
    """Published adapter file -> this project's adapter tensors (names as in
    :func:`ctrlora.models.adapters.adapter_layout`). Returns ``(tensors, rank)``."""
    from ctrlora.models.adapters import adapter_layout, base_state_dict

    not_adapter = sorted(k for k in sd if not is_adapter_key(k))
    if not_adapter:
        raise ValueError(f"unknown keys in adapter file (not LoRA / zero conv / norm): {not_adapter[:20]}")
    base_shapes = {n: tuple(t.shape) for n, t in base_state_dict(model).items()}
    weights, lora = convert_ldm_state_dict(sd, model.config.layers_per_block, base_shapes)
    pairs = lora_pairs(lora)
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter file mixes LoRA ranks {sorted(ranks)}")
    rank = ranks.pop()
    layout = adapter_layout(model, rank)
    tensors = {**weights, **lora}
    missing = sorted(set(layout) - set(tensors))
    unknown = sorted(set(tensors) - set(layout))
    if unknown:
        raise ValueError(f"unknown keys in adapter file: {unknown[:20]}")
    if missing:
        raise ValueError(f"adapter file lacks keys: {missing[:20]}")
    wrong = [f"{n}: {tuple(t.shape)} vs {layout[n]}" for n, t in tensors.items() if tuple(t.shape) != layout[n]]
    if wrong:
        raise ValueError(f"shape mismatch in adapter file: {wrong[:20]}")
    return tensors, rank


def diffusers_to_ldm(weights: Mapping[str, Any], lora: Mapping[str, Any], layers_per_block: int,
                     ldm_names: list[str]) -> dict:
    """Inverse of :func:`convert_ldm_state_dict` given the ldm key set (for tests and export)."""
    keys = _strip_prefix(ldm_names)
    linear_of = {k: k.rsplit(".lora_layer.", 1)[0] + ".weight" for k in keys if "lora_layer" in k}
    names = ldm_to_diffusers_names(sorted({k for k in keys if "lora_layer" not in k} | set(linear_of.values())),
                                   layers_per_block)
    out = {}
    for k in keys:
        if k in linear_of:
            module = names[linear_of[k]][: -len(".weight")]
            out[LDM_PREFIX + k] = lora[module + (".lora_A.weight" if k.endswith(LORA_DOWN) else ".lora_B.weight")]
        else:
            out[LDM_PREFIX + k] = weights[names[k]]
    return out


# ---------------------------------------------------------------------- export (the inverse direction)
_RESBLOCK = ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3", "skip_connection")
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# The ldm ControlNet builds its GroupNorms with 32 groups and fixes these settings; a diffusers
# config that differs is recorded next to the ldm kwargs (``ctrlora_config``) so that
# ``ctrlora convert`` rebuilds the same network, and the model card warns that ldm loaders cannot.
_LDM_FIXED = dict(norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
                  downsample_padding=1, mid_block_scale_factor=1.0, only_cross_attention=False,
                  upcast_attention=False, resnet_time_scale_shift="default")


def _transformer_modules(prefix: str, depth: int) -> list[str]:
    """ldm module paths of one SpatialTransformer, in its module order."""
    mods = [f"{prefix}.norm", f"{prefix}.proj_in"]
    for t in range(depth):
        blk = f"{prefix}.transformer_blocks.{t}"
        mods += [f"{blk}.attn1.{p}" for p in _ATTENTION] + [f"{blk}.ff.net.0.proj", f"{blk}.ff.net.2"]
        mods += [f"{blk}.attn2.{p}" for p in _ATTENTION] + [f"{blk}.norm1", f"{blk}.norm2", f"{blk}.norm3"]
    return mods + [f"{prefix}.proj_out"]


def ldm_module_names(config) -> list[str]:
    """Every ldm module path (no ``control_model.``) a CtrLoRA ControlNet of this diffusers config
    can have, in the ldm ControlNet's module order (the order of the published ``.ckpt`` files):
    time embedding, input blocks (conv, ResBlocks + SpatialTransformers, downsample ``op``), zero
    convs, middle block, ``middle_block_out``. Optional parts (``skip_connection``) are listed;
    :func:`published_names` keeps those the model has."""
    block_types = list(config.down_block_types)
    n = int(config.layers_per_block)
    tlpb = config.transformer_layers_per_block
    depth = int(tlpb) if isinstance(tlpb, int) else max(int(d) for d in tlpb)
    mods = ["time_embed.0", "time_embed.2", "input_blocks.0.0"]
    i = 0
    for level, block_type in enumerate(block_types):
        for _ in range(n):
            i += 1
            mods += [f"input_blocks.{i}.0.{p}" for p in _RESBLOCK]
            if "CrossAttn" in block_type:
                mods += _transformer_modules(f"input_blocks.{i}.1", depth)
        if level < len(block_types) - 1:
            i += 1
            mods.append(f"input_blocks.{i}.0.op")
    mods += [f"zero_convs.{k}.0" for k in range(i + 1)]
    mods += [f"middle_block.0.{p}" for p in _RESBLOCK] + _transformer_modules("middle_block.1", depth)
    mods += [f"middle_block.2.{p}" for p in _RESBLOCK] + ["middle_block_out.0"]
    return mods


def published_names(model) -> dict[str, str]:
    """``{diffusers name: published name}`` for every base tensor of ``model`` and for every LoRA
    tensor an adapter of it has (``<linear>.lora_A.weight`` -> ``control_model.<ldm
    linear>.lora_layer.down.weight``, ``lora_B`` -> ``up``), in the published files' order (ldm
    module order; weight, bias, LoRA down, LoRA up within a module).

    Built by mapping the candidate ldm names of the model's block layout
    (:func:`ldm_module_names`) with :func:`ldm_to_diffusers_names` -- the importer's own map -- and
    inverting it, keeping the names that land on a tensor of the model. Refused (``ValueError``)
    unless every base tensor and every LoRA target gets exactly one name, so any config that the
    published layout can hold (the tiny presets, SD 1.5) exports, and no other does."""
    from ctrlora.models.adapters import base_state_dict, lora_targets

    if model.config.condition_embedding != "vae":
        raise ValueError("a ControlNet with a hint CNN (condition_embedding='cnn') has no published CtrLoRA layout")
    expected = base_state_dict(model)
    linears = set(lora_targets(model))
    mods = ldm_module_names(model.config)
    forward = ldm_to_diffusers_names([f"{m}.{p}" for m in mods for p in ("weight", "bias")],
                                     model.config.layers_per_block)
    names: dict[str, str] = {}
    for m in mods:
        for p in ("weight", "bias"):
            new = forward.get(f"{m}.{p}")
            if new is None or new not in expected:
                continue  # a part this config does not have (skip_connection, to_q.bias ...)
            if new in names:
                raise ValueError(f"{new!r} gets two published names: {names[new]!r} and {LDM_PREFIX}{m}.{p}")
            names[new] = f"{LDM_PREFIX}{m}.{p}"
        weight = forward.get(f"{m}.weight")
        if weight is not None and weight in expected and weight[: -len(".weight")] in linears:
            linear = weight[: -len(".weight")]
            names[f"{linear}.lora_A.weight"] = LDM_PREFIX + m + LORA_DOWN
            names[f"{linear}.lora_B.weight"] = LDM_PREFIX + m + LORA_UP
    missing = [k for k in expected if k not in names]
    missing += sorted(f"{t} (LoRA)" for t in linears if f"{t}.lora_A.weight" not in names)
    if missing:
        raise ValueError(f"no published (ldm) name for {len(missing)} tensor(s) of the model: {missing[:10]}")
    return names


def _heads(head_dim: Any, levels: int) -> tuple[int, ...]:
    """Per-level head counts of an ``attention_head_dim`` config value (one int or one per level)."""
    return (int(head_dim),) * levels if isinstance(head_dim, int) else tuple(int(x) for x in head_dim)


def _plain(value: Any) -> Any:
    """JSON-comparable form of a config value (tuples as lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def ldm_config_from_controlnet(config) -> tuple[dict, dict]:
    """Inverse of :func:`controlnet_config_from_ldm`: ``(ldm ControlNet kwargs, ctrlora_config)``
    for a :class:`CtrLoRAControlNet` config. ``ctrlora_config`` holds the diffusers settings the
    ldm kwargs cannot express (ldm fixes them, e.g. 32 GroupNorm groups), only where this config
    differs; ``ctrlora convert`` applies them after :func:`controlnet_config_from_ldm`, which
    then rebuilds exactly this config. Refused (``ValueError``) for what ldm cannot describe at
    all: a hint CNN, channel widths that are not multiples of the first, per-level head counts
    that are neither equal nor of one head width, per-level transformer depths."""
    from ctrlora.models.controlnet import CtrLoRAControlNet

    c = config
    if c.condition_embedding != "vae":
        raise ValueError("a ControlNet with a hint CNN (condition_embedding='cnn') has no published CtrLoRA layout")
    channels = [int(x) for x in c.block_out_channels]
    mc = channels[0]
    if any(x % mc for x in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first (ldm channel_mult)")
    heads = _heads(c.attention_head_dim, len(c.down_block_types))
    head_kw: dict[str, int]
    if len(set(heads)) == 1:
        head_kw = {"num_heads": heads[0]}
    elif all(x % h == 0 for x, h in zip(channels, heads)) and len({x // h for x, h in zip(channels, heads)}) == 1:
        head_kw = {"num_heads": -1, "num_head_channels": channels[0] // heads[0]}
    else:
        raise ValueError(f"attention heads {list(heads)} over channels {channels}: ldm takes one head count or one head width")
    tlpb = c.transformer_layers_per_block
    if not isinstance(tlpb, int):
        if len(set(tlpb)) != 1:
            raise ValueError("per-level transformer_layers_per_block has no ldm equivalent")
        tlpb = tlpb[0]
    unknown = sorted(set(c.down_block_types) - {"CrossAttnDownBlock2D", "DownBlock2D"})
    if unknown:
        raise ValueError(f"down block types {unknown} have no ldm equivalent")
    kwargs = dict(
        image_size=32,  # required by the ldm constructor, unused by the ControlNet
        in_channels=int(c.conditioning_channels),
        hint_channels=3,  # required by the ldm constructor, unused: CtrLoRA deletes the hint block
        model_channels=mc,
        # downsampling factors of the levels with attention, largest first as the ldm configs list them
        attention_resolutions=sorted((2**i for i, t in enumerate(c.down_block_types) if t == "CrossAttnDownBlock2D"),
                                     reverse=True),
        num_res_blocks=int(c.layers_per_block),
        channel_mult=[x // mc for x in channels],
        **head_kw,
        use_spatial_transformer=True,
        transformer_depth=int(tlpb),
        context_dim=int(c.cross_attention_dim),
        use_linear_in_transformer=bool(c.use_linear_projection),
        legacy=False,
    )
    rebuilt = {**_init_defaults(CtrLoRAControlNet), **controlnet_config_from_ldm(kwargs)}
    overrides: dict[str, Any] = {}
    for key, default in rebuilt.items():
        if key in ("condition_embedding", "conditioning_embedding_out_channels"):
            continue  # vae mode: no hint CNN whose widths would matter
        ours = c.get(key, default)
        if key == "attention_head_dim":
            same = _heads(ours, len(c.down_block_types)) == _heads(default, len(c.down_block_types))
        else:
            same = _plain(ours) == _plain(default)
        if not same:
            overrides[key] = _plain(ours)
    return kwargs, overrides


def _init_defaults(cls) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.default is not inspect.Parameter.empty}


def export_base(model, stale_rank: int = 128) -> dict:
    """The base of ``model`` (adapters left out) in the published layout: ``{control_model.<ldm
    name>: fp32 tensor}`` in ldm module order -- base weights, the base zero convs and the base
    transformer norms -- plus, when ``stale_rank`` > 0, one LoRA set of that rank filled with
    zeros. The published base files carry a stale LoRA set that every loader discards, and the
    ComfyUI-Advanced-ControlNet CtrLoRA loader refuses a base file without one; zeros make the
    set a no-op even for a loader that wrongly applied it. ``stale_rank=0`` leaves it out.
    Tensors are detached float32 views of the model's (no copy when already float32)."""
    import torch

    from ctrlora.models.adapters import adapter_layout, base_state_dict

    base = base_state_dict(model)
    layout = adapter_layout(model, stale_rank) if stale_rank > 0 else {}
    out = {}
    for name, ldm in published_names(model).items():
        if name in base:
            out[ldm] = base[name].detach().to(torch.float32).contiguous()
        elif name in layout:
            out[ldm] = torch.zeros(layout[name], dtype=torch.float32, device=next(iter(base.values())).device)
    return out


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, dict]:
    """``(tensors, config)`` of an adapter directory; every failure names the directory or file."""
    from ctrlora.models.adapters import ADAPTER_WEIGHTS, read_adapter_config

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: adapter folder not found")
    try:
        config = read_adapter_config(adapter_dir)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{adapter_dir}: adapter config is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("rank"), int) or config["rank"] < 1:
        raise ValueError(f"{adapter_dir}: adapter config lacks a positive integer 'rank'")
    return read_state_dict(adapter_dir / ADAPTER_WEIGHTS), config


def export_adapter(model, adapter: str | Path | Mapping[str, Any], alpha: float | None = None,
                   expected_base_hash: str | None = None) -> dict:
    """One adapter of ``model`` in the published layout: ``{control_model.<ldm name>: fp32
    tensor}`` in ldm module order -- LoRA ``lora_layer.down`` (= ``lora_A``) / ``.up`` (=
    ``lora_B``) of every Linear, the 13 (at SD scale) zero convs, the transformer norms.

    ``adapter`` is an adapter directory (rank and alpha from its config; with
    ``expected_base_hash``, one trained on another base is refused) or a tensor dict with the
    adapter-file names (rank from its LoRA, ``alpha`` defaults to the rank). The published
    layout has no alpha: its LoRA scale is 1, so for alpha != rank the scale alpha / rank is
    folded into ``up`` (the adapter then computes the same); at alpha == rank the tensors are
    written unchanged."""
    import torch

    from ctrlora.models.adapters import ADAPTER_CONFIG, _check_keys, adapter_layout

    where = "adapter tensors"
    if isinstance(adapter, (str, Path)):
        where = str(adapter)
        tensors, config = read_adapter_dir(adapter)
        if expected_base_hash is not None and config.get("base_hash") != expected_base_hash:
            raise ValueError(f"{adapter}: adapter was trained on another base (base_hash {config.get('base_hash')!r} "
                             f"in {ADAPTER_CONFIG}, the base is {expected_base_hash!r}); an adapter is exported "
                             f"only with the base it was trained on")
        rank = int(config["rank"])
        alpha = float(config.get("alpha", rank)) if alpha is None else alpha
    else:
        tensors = dict(adapter)
        ranks = {tuple(v.shape)[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
        if len(ranks) != 1:
            raise ValueError(f"{where}: LoRA ranks {sorted(ranks)} (need exactly one)")
        rank = ranks.pop()
    _check_keys(tensors, adapter_layout(model, rank), f"{where}: tensors", f"the base's rank-{rank} adapter layout")
    scale = 1.0 if alpha is None else float(alpha) / rank
    out = {}
    for name, ldm in published_names(model).items():
        if name in tensors:
            t = tensors[name].detach().to(torch.float32)
            out[ldm] = (t * scale if scale != 1.0 and name.endswith(".lora_B.weight") else t).contiguous()
    return out


# ---------------------------------------------------------------------- CLI
SD15_LDM_KWARGS = dict(
    in_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
    attention_resolutions=[4, 2, 1], num_heads=8, use_spatial_transformer=True,
    transformer_depth=1, context_dim=768, legacy=False,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="published base ControlNet file (.safetensors/.ckpt)")
    parser.add_argument("--adapter", type=Path, action="append", default=[],
                        help="published adapter file; repeat for several (name = file stem unless --name)")
    parser.add_argument("--name", action="append", default=[], help="condition name for each --adapter, in order")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (new or empty): <out>/base, <out>/adapters/<name>")
    parser.add_argument("--ldm-config", type=Path, default=None,
                        help="JSON of ldm ControlNet kwargs (default: the SD 1.5 CtrLoRA config); "
                             "`ctrlora export` writes one as ldm_config.json")


def _ldm_kwargs(path: Path | None) -> dict:
    """The ldm ControlNet kwargs of ``--ldm-config`` (or SD 1.5's), checked enough to name the
    file when something is missing."""
    if path is None:
        return dict(SD15_LDM_KWARGS)
    try:
        kwargs = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: ldm config not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(kwargs, dict):
        kwargs = kwargs.get("controlnet_kwargs", kwargs)
    required = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                "context_dim")
    missing = [k for k in required if not isinstance(kwargs, dict) or k not in kwargs]
    if missing:
        raise ValueError(f"{path}: ldm config lacks {missing}")
    return kwargs


def _config_overrides(path: Path | None) -> dict:
    """The ``ctrlora_config`` object of an ``--ldm-config`` file (``ctrlora export`` writes one
    when the model has settings ldm fixes, e.g. 16 GroupNorm groups); ``{}`` when absent."""
    from ctrlora.models.controlnet import CtrLoRAControlNet

    if path is None:
        return {}
    data = json.loads(Path(path).read_text())  # readable: _ldm_kwargs read it first
    overrides = data.get("ctrlora_config", {}) if isinstance(data, dict) else {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: 'ctrlora_config' must be a JSON object of CtrLoRAControlNet settings")
    unknown = sorted(set(overrides) - set(_init_defaults(CtrLoRAControlNet)))
    if unknown:
        raise ValueError(f"{path}: unknown CtrLoRAControlNet settings in 'ctrlora_config': {unknown}")
    return overrides


def _check_request(args) -> list[tuple[str, Path]]:
    """(name, file) of every adapter, after the checks that need no model: names, files, output."""
    if args.name and len(args.name) != len(args.adapter):
        raise ValueError(f"give one --name per --adapter ({len(args.name)} names, {len(args.adapter)} adapters)")
    named = [(args.name[i] if args.name else p.stem, p) for i, p in enumerate(args.adapter)]
    names = [n for n, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"adapter name(s) {twice} given twice (use --name)")
    bad = [n for n in names if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"adapter name(s) {bad} cannot be folder names")
    for p in [args.base, *args.adapter]:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: checkpoint not found")
        if Path(p).suffix == ".safetensors":
            check_safetensors(p)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty (choose a new --out or remove it)")
    return named


@contextlib.contextmanager
def _atomic_output(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, renamed to ``out`` when the block completes
    and removed when it fails, so a failure leaves no output folder behind (an existing ``out``
    must have been checked empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(args) -> int:
    """Convert into a temporary sibling of ``--out`` and rename it into place only when the base
    and every adapter converted: a failure leaves no output folder behind."""
    from ctrlora.models.adapters import base_hash, save_adapter_tensors
    from ctrlora.models.controlnet import CtrLoRAControlNet

    named = _check_request(args)
    kwargs = _ldm_kwargs(args.ldm_config)
    overrides = _config_overrides(args.ldm_config)
    try:
        model = CtrLoRAControlNet(**{**controlnet_config_from_ldm(kwargs), **overrides})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{args.ldm_config or 'the SD 1.5 ldm config'}: unusable ldm config ({exc})") from None
    out = Path(args.out)
    with _atomic_output(out) as tmp:
        try:
            weights, stale = convert_base(read_state_dict(args.base), model)
        except ValueError as exc:
            raise ValueError(f"{args.base}: {exc}" if str(args.base) not in str(exc) else str(exc)) from None
        model.load_state_dict(weights, strict=True)
        model.save_pretrained(tmp / "base")
        bh = base_hash(model)
        report: dict[str, Any] = {"base": str(out / "base"), "base_hash": bh, "discarded_stale_lora_keys": len(stale), "adapters": {}}
        for name, path in named:
            try:
                tensors, rank = convert_adapter(read_state_dict(path), model)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
            save_adapter_tensors(tensors, tmp / "adapters" / name, condition=name, rank=rank, alpha=rank,
                                 base_hash=bh, model=model)
            report["adapters"][name] = {"dir": str(out / "adapters" / name), "rank": rank, "tensors": len(tensors)}
    print(json.dumps(report, indent=1))
    return 0


# ---------------------------------------------------------------------- CLI: ctrlora export
EXPORT_FORMATS = ("safetensors", "ckpt")
_RESERVED_STEMS = ("base", "ldm_config", "README")
_BASE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="base ControlNet folder (save_pretrained, e.g. models/base)")
    parser.add_argument("--adapter", type=Path, action="append", default=[],
                        help="adapter folder (e.g. models/adapters/lighting); repeat for several; the file is "
                             "named after the condition in its adapter_config.json")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (new or empty): base.<ext>, <condition>.<ext>, ldm_config.json, README.md")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors",
                        help="safetensors (default) or ckpt (torch.save of the plain dict)")
    parser.add_argument("--stale-rank", type=int, default=None,
                        help="rank of the all-zero LoRA set written into the base file, as the published base carries "
                             "one and ComfyUI's CtrLoRA loader requires it (default: the first adapter's rank, "
                             "else 128; 0 leaves it out)")


def _check_export_request(args) -> list[tuple[str, Path, dict]]:
    """(condition, folder, config) of every adapter, after the checks that need no model."""
    from ctrlora.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    base = Path(args.base)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: base folder not found")
    for name in ("config.json", _BASE_WEIGHTS):
        if not (base / name).is_file():
            raise FileNotFoundError(f"{base}: not a base ControlNet folder (no {name}; expected what "
                                    f"CtrLoRAControlNet.save_pretrained writes)")
    check_safetensors(base / _BASE_WEIGHTS)
    if args.stale_rank is not None and args.stale_rank < 0:
        raise ValueError(f"--stale-rank must be >= 0, got {args.stale_rank}")
    named: list[tuple[str, Path, dict]] = []
    for folder in map(Path, args.adapter):
        tensors_ok = (folder / ADAPTER_WEIGHTS).is_file()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: adapter folder not found")
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({exc})") from None
        if not tensors_ok:
            raise FileNotFoundError(f"{folder}: not an adapter folder (no {ADAPTER_WEIGHTS})")
        check_safetensors(folder / ADAPTER_WEIGHTS)
        cond = config.get("condition") if isinstance(config, dict) else None
        if not isinstance(cond, str) or not cond or "/" in cond or "\\" in cond or cond.startswith(".") \
                or cond in _RESERVED_STEMS:
            raise ValueError(f"{folder / ADAPTER_CONFIG}: condition {cond!r} cannot name an exported file (a "
                             f"non-empty name without '/', not starting with '.', not one of {list(_RESERVED_STEMS)})")
        if not isinstance(config.get("rank"), int) or config["rank"] < 1:
            raise ValueError(f"{folder / ADAPTER_CONFIG}: no positive integer 'rank'")
        named.append((cond, folder, config))
    conds = [c for c, _, _ in named]
    twice = sorted({c for c in conds if conds.count(c) > 1})
    if twice:
        folders = [str(f) for c, f, _ in named if c in twice]
        raise ValueError(f"condition(s) {twice} come from several adapter folders {folders}; export each condition once")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty (choose a new --out or remove it)")
    return named


def _write_published(tensors: Mapping[str, Any], path: Path, fmt: str) -> None:
    """A flat ``name -> float32 tensor`` dict as ``.safetensors`` or as ``torch.save`` of the plain
    dict (no ``state_dict`` wrapper: the published files have none, and every loader -- ours, the
    reference's, ComfyUI's -- reads the flat dict)."""
    import torch

    plain = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(plain, str(path), metadata={"format": "pt"})
    else:
        torch.save(plain, str(path))


def comfyui_head_mismatch(ldm_kwargs: Mapping[str, Any]) -> str | None:
    """Why ComfyUI would build other attention heads than this base has, or ``None``.

    ComfyUI reads channels, blocks, depth and context width from the tensors but takes the head
    layout from its model table: 8 heads for the SD 1.5 shape (model_channels 320, context_dim
    768, conv proj_in), 64-channel heads for a shape it does not know. A base whose heads differ
    fails to load there (fewer than 64 channels: no heads, zero-sized weights) or loads and
    computes another network (attention weights do not depend on the head count)."""
    kw = ldm_kwargs
    mc, mult = int(kw["model_channels"]), [int(m) for m in kw["channel_mult"]]
    levels = [i for i in range(len(mult)) if 2**i in kw["attention_resolutions"]]
    channels = [mc * mult[i] for i in levels] + [mc * mult[-1]]  # the middle block: last level's width
    if kw.get("num_heads", -1) != -1:
        heads = [int(kw["num_heads"])] * len(channels)
    else:
        heads = [c // int(kw["num_head_channels"]) for c in channels]
    sd15 = mc == 320 and kw.get("context_dim") == 768 and not kw.get("use_linear_in_transformer", False)
    want = [8] * len(channels) if sd15 else [c // 64 for c in channels]
    if heads == want:
        return None
    rule = "8 heads (its SD 1.5 entry)" if sd15 else "64-channel heads (a shape not in its table)"
    effect = ("fails to load it (zero-sized attention weights)" if 0 in want
              else "loads it but computes another network")
    return (f"ComfyUI takes the attention heads from its model table, not from the tensors: it would build "
            f"{rule}, i.e. {want} heads at widths {channels} (transformer levels, then the middle block), where "
            f"this base has {heads}; so its CtrLoRA loader {effect}.")


def _model_card(files: list[dict], base_dir: Path, base_hash_: str, fmt: str, overrides: dict,
                ldm_kwargs: Mapping[str, Any] | None = None) -> str:
    """README.md of an export folder: what each file is, how to load it."""
    adapters_ = [f for f in files if f["kind"] == "adapter"]
    base = next(f for f in files if f["kind"] == "base")
    stale = (f"plus a stale LoRA set of rank {base['stale_rank']} ({base['stale_tensors']} tensors, all zeros) "
             f"that loaders discard" if base["stale_rank"] else "no stale LoRA set")
    rows = [f"| `{base['file']}` | base ControlNet from `{base_dir}`: base weights, base zero convs and "
            f"transformer norms, {stale} | {base['tensors']} | {base['params']:,} | – | `{base['sha256']}` |"]
    for a in adapters_:
        folded = f"; alpha {a['alpha']:g} folded into `up`" if a["alpha"] != a["rank"] else ""
        rows.append(f"| `{a['file']}` | adapter `{a['condition']}` from `{a['source']}`: LoRA down/up of every "
                    f"Linear, zero convs, transformer norms{folded} | {a['tensors']} | {a['params']:,} | "
                    f"{a['rank']} | `{a['sha256']}` |")
    example = adapters_[0]["file"] if adapters_ else f"<condition>.{fmt}"
    name = example.rsplit(".", 1)[0]
    lines = [
        "# CtrLoRA ControlNet checkpoints (published layout)",
        "",
        "Written by `ctrlora export` (ctrlora-dental) from the folders named below.",
        "",
        "| file | what | tensors | params | rank | sha256 |",
        "|---|---|---|---|---|---|",
        *rows,
        "| `ldm_config.json` | the ldm ControlNet kwargs of this base (`controlnet_kwargs`) and the settings "
        "they cannot express (`ctrlora_config`) | | | | |",
        "",
        f"Base hash (sha256 of the base tensors, as `ctrlora.models.adapters.base_hash` computes it): "
        f"`{base_hash_}`. Every adapter here records this hash as the base it was trained on.",
        "",
        "## Layout",
        "",
        "The layout of the CtrLoRA reference checkpoints (github.com/xyfJASON/ctrlora): flat dicts "
        "`name -> float32 tensor`, every name under `control_model.` with the ldm ControlNet's names, no "
        "`state_dict` wrapper; a `.ckpt` is `torch.save` of the dict (it loads with "
        "`torch.load(weights_only=True)`). LoRA sits on every `nn.Linear` as "
        "`<linear>.lora_layer.down.weight` [r, in] and `<linear>.lora_layer.up.weight` [out, r] with scale 1: "
        "`y = W x + b + up(down(x))`. An adapter file holds the LoRA, the zero convs "
        "(`zero_convs.{i}.0`, `middle_block_out.0`) and the spatial-transformer norms (`norm`, `norm1..3`). "
        "A key belongs to the adapter iff it contains `lora_layer`, `zero_convs`, `middle_block_out` or "
        "`norm`; a loader takes every other key from the base file and these from the adapter file.",
        "",
        "## Loading",
        "",
        f"* ctrlora-dental: `ctrlora convert --base {base['file']} --adapter {example} --ldm-config "
        f"ldm_config.json --out imported` gives `imported/base` and `imported/adapters/{name}`.",
        "* ComfyUI: put the files in `models/controlnet/` and use ComfyUI-Advanced-ControlNet's CtrLoRA "
        f"loader node (`CtrLoRALoader`): `base` = `{base['file']}`, `lora` = an adapter file. It reads the "
        "widths and depths from the base tensors but the attention heads from its own model table (8 heads "
        "for the SD 1.5 shape, else 64-channel heads), and needs the base file's stale LoRA set.",
        "* The CtrLoRA reference code: its base + adapter loading with the ldm kwargs of `ldm_config.json`.",
    ]
    fixed = {k: v for k, v in overrides.items() if k in _LDM_FIXED}
    heads = comfyui_head_mismatch(ldm_kwargs) if ldm_kwargs else None
    if fixed or heads:
        lines += ["", "## Caution", ""]
    if fixed:
        diffs = ", ".join(f"{k}={v!r} (ldm: {_LDM_FIXED[k]!r})" for k, v in sorted(fixed.items()))
        lines += [f"This base uses settings the ldm ControlNet fixes otherwise: {diffs}. ldm-based loaders (the "
                  "reference, ComfyUI) load these tensors but compute a different network; `ctrlora convert "
                  "--ldm-config ldm_config.json` rebuilds the network as trained."]
    if heads:
        lines += (["", heads] if fixed else [heads])
    return "\n".join(lines) + "\n"


def run_export(args) -> int:
    """Export into a temporary sibling of ``--out`` and rename it into place only when the base
    and every adapter are written: a failure leaves no output folder behind."""
    from ctrlora.models.adapters import base_hash
    from ctrlora.models.controlnet import CtrLoRAControlNet

    named = _check_export_request(args)
    try:
        model = CtrLoRAControlNet.from_pretrained(str(args.base), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{args.base}: not a loadable base ControlNet folder ({first})") from None
    bh = base_hash(model)
    for cond, folder, config in named:
        if config.get("base_hash") != bh:
            raise ValueError(f"{folder}: adapter {cond!r} was trained on another base (base_hash "
                             f"{config.get('base_hash')!r} in its config, {args.base} is {bh!r}); an adapter is "
                             f"exported only with the base it was trained on")
    try:
        ldm_kwargs, overrides = ldm_config_from_controlnet(model.config)
        published_names(model)  # every tensor has a published name, checked before anything is written
    except ValueError as exc:
        raise ValueError(f"{args.base}: cannot be written in the published layout: {exc}") from None
    stale_rank = args.stale_rank if args.stale_rank is not None else (int(named[0][2]["rank"]) if named else 128)
    fmt = args.format
    out = Path(args.out)
    with _atomic_output(out) as tmp:
        files: list[dict] = []
        base_sd = export_base(model, stale_rank)
        n_stale = sum(1 for k in base_sd if "lora_layer" in k)
        _write_published(base_sd, tmp / f"base.{fmt}", fmt)
        files.append({"kind": "base", "file": f"base.{fmt}", "source": str(args.base), "tensors": len(base_sd),
                      "params": int(sum(v.numel() for v in base_sd.values())), "stale_rank": stale_rank,
                      "stale_tensors": n_stale, "sha256": sha256_file(tmp / f"base.{fmt}")})
        del base_sd
        for cond, folder, config in named:
            sd = export_adapter(model, folder, expected_base_hash=bh)
            _write_published(sd, tmp / f"{cond}.{fmt}", fmt)
            files.append({"kind": "adapter", "file": f"{cond}.{fmt}", "condition": cond, "source": str(folder),
                          "rank": int(config["rank"]), "alpha": float(config.get("alpha", config["rank"])),
                          "tensors": len(sd), "params": int(sum(v.numel() for v in sd.values())),
                          "sha256": sha256_file(tmp / f"{cond}.{fmt}")})
        (tmp / "ldm_config.json").write_text(json.dumps({"controlnet_kwargs": ldm_kwargs, "ctrlora_config": overrides},
                                                        indent=1) + "\n")
        (tmp / "README.md").write_text(_model_card(files, Path(args.base), bh, fmt, overrides, ldm_kwargs))
    print(json.dumps({"out": str(out), "base_hash": bh, "format": fmt, "files": files}, indent=1))
    return 0


# the `ctrlora export` sub-command, in the shape ctrlora.cli expects of a command module
EXPORT_COMMAND = argparse.Namespace(add_arguments=add_export_arguments, run=run_export)
