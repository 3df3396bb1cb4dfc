"""``ctrlora generate``: condition images + adapter folders + a prompt -> PNG images.

    ctrlora generate --backbone foundation/backbone --base models/base \
        --adapter lighting=models/adapters/lighting:1.0 \
        --adapter segmentation=models/base/adapters/segmentation:0.5 \
        --condition lighting=light.png --condition segmentation=seg.png \
        --prompt "upper jaw molar photo" --steps 50 --guidance 7.5 --seed 0 --num-images 4 --out out/

Every part is a local folder. ``--condition __base__=IMAGE`` runs the base ControlNet without an
adapter. Image ``i`` uses seed ``seed + i`` (reproducible on its own). The images and a
``generate.json`` record of the request are written to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

Pairs = dict[str, tuple[str, float | None]]   # name -> (value, weight or None)


class GenerateError(Exception):
    """A problem with the command's inputs, reported without a traceback."""


def add_arguments(parser: argparse.ArgumentParser, parts_required: bool = True) -> None:
    """The command's options. ``parts_required=False`` lets a caller that can supply the
    backbone and base some other way leave ``--backbone`` / ``--base`` out."""
    parser.add_argument("--backbone", required=parts_required, help="backbone directory (diffusers SD layout)")
    parser.add_argument("--base", required=parts_required, help="base ControlNet directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR[:WEIGHT]",
                        help="condition adapter directory, weight default 1.0; repeatable")
    parser.add_argument("--condition", action="append", default=[], metavar="NAME=IMAGE[:WEIGHT]",
                        help="condition image for adapter NAME (or __base__ = base only); a weight here "
                             "overrides the adapter's; repeatable")
    parser.add_argument("--prompt", default="", help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="text of the unconditional CFG branch (default empty)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    # the names of ctrlora.sampling.SCHEDULERS, spelled out so --help does not import diffusers
    parser.add_argument("--scheduler", choices=("ddim", "dpm", "dpm_karras", "unipc"), default="ddim",
                        help="DDIM (eta 0), DPM-Solver++ 2M, DPM-Solver++ 2M with Karras sigmas, or UniPC")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
    parser.add_argument("--strength", type=float, default=1.0, help="control strength (default 1.0)")
    parser.add_argument("--num-images", type=int, default=1, help="number of images (default 1)")
    parser.add_argument("--height", type=int, default=None, help="output height (default: the condition images')")
    parser.add_argument("--width", type=int, default=None, help="output width (default: the condition images')")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--out", required=True, help="output directory for the PNGs")


def _split_weight(value: str) -> tuple[str, float | None]:
    """``"X:0.5"`` -> (``"X"``, 0.5); a trailing part that is not a number belongs to X (URIs,
    paths), and so does everything when X itself is an existing path."""
    if ":" not in value or Path(value).exists():
        return value, None
    head, tail = value.rsplit(":", 1)
    try:
        return head, float(tail)
    except ValueError:
        return value, None


def parse_pairs(items: list[str], what: str) -> Pairs:
    """``["NAME=VALUE[:WEIGHT]", ...]`` (the values of option ``--<what>``) -> ``{NAME: (VALUE,
    WEIGHT or None)}``."""
    out: Pairs = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not name or not rest:
            raise GenerateError(f"--{what} {item!r}: expected NAME=VALUE")
        if name in out:
            raise GenerateError(f"--{what} {name!r} given twice")
        out[name] = _split_weight(rest)
    return out


def check_images(conditions: Pairs) -> None:
    """Every condition image exists and is an image PIL can read (checked before anything
    expensive is loaded)."""
    from PIL import Image

    for name, (path, _) in conditions.items():
        if not Path(path).is_file():
            raise GenerateError(f"condition {name!r}: image {path} does not exist")
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # UnidentifiedImageError, truncated data, ...
            raise GenerateError(f"condition {name!r}: {path} is not a readable image ({exc})") from None


def check_weight_files(folder: str | Path, what: str) -> None:
    """Every ``.safetensors`` file under ``folder`` has a readable header and is complete (a
    truncated copy is named here, not deep inside a loader)."""
    from ctrlora.models.convert import check_safetensors

    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            check_safetensors(f)
        except ValueError as exc:
            raise GenerateError(f"{what}: {exc}") from None


def _check_request(args) -> tuple[Pairs, Pairs]:
    """The adapters and conditions of the command line, checked against each other."""
    from ctrlora.models.adapters import BASE_NAME

    if args.num_images < 1:
        raise GenerateError("--num-images must be >= 1")
    if args.steps < 1:
        raise GenerateError("--steps must be >= 1")
    if not args.backbone or not args.base:
        raise GenerateError("--backbone and --base are required")
    adapters = parse_pairs(args.adapter, "adapter")
    conditions = parse_pairs(args.condition, "condition")
    if BASE_NAME in adapters:
        raise GenerateError(f"{BASE_NAME!r} is not an adapter name (use --condition {BASE_NAME}=IMAGE)")
    unknown = sorted(set(conditions) - set(adapters) - {BASE_NAME})
    if unknown:
        raise GenerateError(f"unknown condition(s) {unknown}: no --adapter with that name "
                            f"(adapters: {sorted(adapters)}; {BASE_NAME} = base only)")
    unused = sorted(set(adapters) - set(conditions))
    if unused:
        raise GenerateError(f"adapter(s) {unused} have no --condition image")
    check_images(conditions)
    for name, (path, _) in adapters.items():
        if not Path(path).is_dir():
            raise GenerateError(f"adapter {name!r}: directory {path} does not exist")
    for what, folder in (("--backbone", args.backbone), ("--base", args.base),
                         *((f"adapter {n!r}", d) for n, (d, _) in adapters.items())):
        if not Path(folder).is_dir():
            raise GenerateError(f"{what}: directory {folder} does not exist")
        check_weight_files(folder, what)
    return adapters, conditions


def _load_pipeline(args, adapters: Pairs):
    import torch

    from ctrlora.sampling import CtrLoRAPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    return CtrLoRAPipeline.from_pretrained_parts(
        Path(args.backbone), Path(args.base), {name: Path(d) for name, (d, _) in adapters.items()},
        torch_dtype=None if dtype == torch.float32 else dtype, device=device)


def _generate(args, sources: Mapping[str, str]) -> list[Path]:
    from ctrlora.data.files import read_png

    adapters, conditions = _check_request(args)
    pipe = _load_pipeline(args, adapters)
    conds = {}
    for name, (path, weight) in conditions.items():
        if weight is None:  # the condition's own weight wins, then the adapter's, then 1
            weight = adapters.get(name, (None, None))[1]
        conds[name] = (read_png(path, "RGB", convert=True), 1.0 if weight is None else weight)
    seeds = [args.seed + i for i in range(args.num_images)]
    out = pipe(args.prompt, conds, num_inference_steps=args.steps, guidance_scale=args.guidance,
               negative_prompt=args.negative_prompt, scheduler=args.scheduler, control_strength=args.strength,
               seed=seeds, num_images_per_prompt=args.num_images,
               height=args.height, width=args.width, eta=args.eta, output_type="pil")

    out_dir = Path(args.out)
    names = [f"image_{i:03d}_seed{seed}.png" for i, seed in enumerate(seeds)]
    paths = [out_dir / n for n in names]
    record = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "guidance": args.guidance, "scheduler": args.scheduler, "eta": args.eta, "strength": args.strength,
        "seeds": seeds,
        "backbone": sources.get("backbone", args.backbone), "base": sources.get("base", args.base),
        "adapters": {n: sources.get(n, adapters[n][0]) for n in adapters},
        "conditions": {n: {"image": conditions[n][0], "weight": conds[n][1]} for n in conditions},
        "images": names,
    }
    files: dict[str, Callable[..., Any]] = {n: (lambda f, img=img: img.save(f)) for n, img in zip(names, out.images)}
    files["generate.json"] = lambda f: f.write_text(json.dumps(record, indent=1) + "\n")
    _write_all(out_dir, files)
    return paths


def _write_all(out_dir: Path, files: Mapping[str, Callable[[Path], None]]) -> None:
    """Write every file into a temporary sibling of ``out_dir``, then move them in: a failure
    while writing leaves ``out_dir`` as it was (files of earlier runs with other names stay)."""
    import os
    import shutil
    import tempfile

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        if not out_dir.exists():
            os.rename(tmp, out_dir)
            return
        for name in files:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, sources: Mapping[str, str] | None = None, prog: str = "ctrlora generate") -> int:
    """Generate and print the image paths; input errors are printed (exit 2), not raised.

    ``sources``: how ``generate.json`` names a part (keys ``backbone``, ``base`` or an adapter
    name) that reached this command as a folder standing in for something else, e.g. a download.
    """
    try:
        paths = _generate(args, dict(sources or {}))
    except (GenerateError, FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        if getattr(args, "debug", False):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
