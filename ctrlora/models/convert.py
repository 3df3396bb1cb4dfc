"""Import the published (ldm-format) CtrLoRA checkpoints: ``ctrlora convert``.

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
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Mapping

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
                        help="JSON of ldm ControlNet kwargs (default: the SD 1.5 CtrLoRA config)")


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


def run(args) -> int:
    """Convert into a temporary sibling of ``--out`` and rename it into place only when the base
    and every adapter converted: a failure leaves no output folder behind."""
    import os
    import shutil
    import tempfile

    from ctrlora.models.adapters import base_hash, save_adapter_tensors
    from ctrlora.models.controlnet import CtrLoRAControlNet

    named = _check_request(args)
    kwargs = _ldm_kwargs(args.ldm_config)
    try:
        model = CtrLoRAControlNet(**controlnet_config_from_ldm(kwargs))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{args.ldm_config or 'the SD 1.5 ldm config'}: unusable ldm config ({exc})") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps(report, indent=1))
    return 0
