"""``ctrlora generate``: condition images + adapters + a prompt -> PNG images.

    ctrlora generate --backbone models/backbone --base models/base \
        --adapter lighting=models/adapters/lighting:1.0 \
        --adapter segmentation=models:/ctrlora-segmentation@champion:0.5 \
        --condition lighting=light.png --condition segmentation=seg.png \
        --prompt "upper jaw molar photo" --steps 50 --guidance 7.5 --seed 0 --num-images 4 --out out/

An adapter is a directory or an MLflow registry URI (``models:/ctrlora-<c>@alias`` or
``models:/ctrlora-<c>/<version>``); a URI also brings the backbone and base it was registered
with, so ``--backbone`` / ``--base`` may then be left out. ``--condition __base__=IMAGE`` runs the
base ControlNet without an adapter. Image ``i`` uses seed ``seed + i`` (reproducible on its own).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASE_ONLY = "__base__"  # same value as ctrlora.models.adapters.BASE_NAME (kept import-free here)


class GenerateError(Exception):
    """A problem with the command's inputs, reported without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help="backbone directory (diffusers SD layout); optional with models:/ adapters")
    parser.add_argument("--base", help="base ControlNet directory; optional with models:/ adapters")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR_OR_URI[:WEIGHT]",
                        help="condition adapter (directory or models:/ctrlora-<c>@alias), weight default 1.0; "
                             "repeatable")
    parser.add_argument("--condition", action="append", default=[], metavar="NAME=IMAGE[:WEIGHT]",
                        help="condition image for adapter NAME (or __base__ = base only); a weight here "
                             "overrides the adapter's; repeatable")
    parser.add_argument("--prompt", default="", help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="text of the unconditional CFG branch (default empty)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim", help="DDIM (eta 0) or DPM-Solver++")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
    parser.add_argument("--strength", type=float, default=1.0, help="control strength (default 1.0)")
    parser.add_argument("--num-images", type=int, default=1, help="number of images (default 1)")
    parser.add_argument("--height", type=int, default=None, help="output height (default: the condition images')")
    parser.add_argument("--width", type=int, default=None, help="output width (default: the condition images')")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--out", required=True, help="output directory for the PNGs")


def _split_weight(value: str, what: str) -> tuple[str, float | None]:
    """``"X:0.5"`` -> (``"X"``, 0.5); a trailing part that is not a number belongs to X (URIs,
    paths), and so does everything when X itself is an existing path."""
    if ":" not in value or Path(value).exists():
        return value, None
    head, tail = value.rsplit(":", 1)
    try:
        return head, float(tail)
    except ValueError:
        return value, None


def _parse_pairs(items: list[str], what: str) -> dict[str, tuple[str, float | None]]:
    out: dict[str, tuple[str, float | None]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not name or not rest:
            raise GenerateError(f"--{what} {item!r}: expected NAME=VALUE")
        if name in out:
            raise GenerateError(f"--{what} {name!r} given twice")
        out[name] = _split_weight(rest, what)
    return out


def _resolve_adapters(adapters: dict[str, tuple[str, float | None]]):
    """Adapter directories; backbone / base directories brought by registry URIs."""
    dirs: dict[str, Path] = {}
    resolved = []
    for name, (where, _) in adapters.items():
        if where.startswith("models:/"):
            from pipelines.registry import resolve_adapter_uri  # MLflow only when a URI is used

            try:
                r = resolve_adapter_uri(where)
            except Exception as exc:  # MLflow / registry errors: report them plainly
                raise GenerateError(f"adapter {name!r}: {exc}") from exc
            dirs[name] = Path(r.adapter)
            resolved.append((name, where, r))
        else:
            d = Path(where)
            if not d.is_dir():
                raise GenerateError(f"adapter {name!r}: directory {d} does not exist")
            dirs[name] = d
    return dirs, resolved


def _base_digest(base_dir: Path) -> str:
    """sha256 over a base ControlNet directory's config and weight files."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(base_dir.glob("*.json")) + sorted(base_dir.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _pick(given: str | None, resolved, attr: str, flag: str, hasher) -> Path:
    if given:
        return Path(given)
    if not resolved:
        raise GenerateError(f"{flag} is required (no models:/ adapter to take it from)")
    first = Path(getattr(resolved[0][2], attr))
    if len(resolved) > 1:
        ref = hasher(first)
        for name, uri, r in resolved[1:]:
            if hasher(Path(getattr(r, attr))) != ref:
                raise GenerateError(f"{uri} was registered with another {attr} than {resolved[0][1]}; "
                                    f"pass {flag} explicitly")
    return first


def _generate(args) -> list[Path]:
    import torch
    from PIL import Image

    from ctrlora.models.backbone import backbone_hash

    if args.num_images < 1:
        raise GenerateError("--num-images must be >= 1")
    if args.steps < 1:
        raise GenerateError("--steps must be >= 1")
    adapters = _parse_pairs(args.adapter, "adapter")
    conditions = _parse_pairs(args.condition, "condition")
    if BASE_ONLY in adapters:
        raise GenerateError(f"{BASE_ONLY!r} is not an adapter name (use --condition {BASE_ONLY}=IMAGE)")
    unknown = sorted(set(conditions) - set(adapters) - {BASE_ONLY})
    if unknown:
        raise GenerateError(f"unknown condition(s) {unknown}: no --adapter with that name "
                            f"(adapters: {sorted(adapters)}; {BASE_ONLY} = base only)")
    unused = sorted(set(adapters) - set(conditions))
    if unused:
        raise GenerateError(f"adapter(s) {unused} have no --condition image")
    images = {}
    for name, (path, _) in conditions.items():
        p = Path(path)
        if not p.is_file():
            raise GenerateError(f"condition {name!r}: image {p} does not exist")
        images[name] = Image.open(p).convert("RGB")

    adapter_dirs, resolved = _resolve_adapters(adapters)
    backbone = _pick(args.backbone, resolved, "backbone", "--backbone", backbone_hash)
    base = _pick(args.base, resolved, "base", "--base", _base_digest)

    from ctrlora.pipeline import CtrLoRAPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    try:
        pipe = CtrLoRAPipeline.from_pretrained_parts(backbone, base, adapter_dirs,
                                                     torch_dtype=None if dtype == torch.float32 else dtype,
                                                     device=device)
    finally:  # everything is in memory now; drop the registry downloads
        import shutil

        for _, _, r in resolved:
            shutil.rmtree(r.local_dir, ignore_errors=True)
    origin = {name: uri for name, uri, _ in resolved}
    weights = {}
    for name, (_, w) in conditions.items():
        weights[name] = w if w is not None else (adapters[name][1] if name in adapters else None)
    conds = {name: (images[name], 1.0 if weights[name] is None else weights[name]) for name in conditions}
    out = pipe(args.prompt, conds, num_inference_steps=args.steps, guidance_scale=args.guidance,
               negative_prompt=args.negative_prompt, scheduler=args.scheduler, control_strength=args.strength,
               seed=[args.seed + i for i in range(args.num_images)], num_images_per_prompt=args.num_images,
               height=args.height, width=args.width, eta=args.eta, output_type="pil")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(out.images):
        path = out_dir / f"image_{i:03d}_seed{args.seed + i}.png"
        img.save(path)
        paths.append(path)
    record = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "guidance": args.guidance, "scheduler": args.scheduler, "eta": args.eta, "strength": args.strength,
        "seeds": [args.seed + i for i in range(args.num_images)],
        "backbone": args.backbone or f"from {resolved[0][1]}", "base": args.base or f"from {resolved[0][1]}",
        "adapters": {n: adapters[n][0] for n in adapters},
        "conditions": {n: {"image": conditions[n][0], "weight": conds[n][1]} for n in conditions},
        "images": [p.name for p in paths],
    }
    (out_dir / "generate.json").write_text(json.dumps(record, indent=1) + "\n")
    return paths


def run(args) -> int:
    try:
        paths = _generate(args)
    except (GenerateError, FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"ctrlora generate: error: {msg}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
