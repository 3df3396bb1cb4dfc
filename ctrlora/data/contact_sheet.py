"""Contact sheet: photo and every condition side by side for a few scans, upscaled (nearest).

``python -m ctrlora.data.contact_sheet --out docs/images/contact_sheet.png`` renders the scans
fresh from their seeds, so it needs no prepared data.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctrlora.data.conditions import CONDITIONS, encode_u8
from ctrlora.data.render import RenderConfig, render_scan, scan_id_for, scan_seed

DEFAULT_INDICES = (0, 1, 2, 3, 4, 5)


def contact_sheet(seed: int = 0, indices: tuple[int, ...] = DEFAULT_INDICES, resolution: int = 64,
                  scale: int = 3, gap: int = 4) -> Image.Image:
    columns = ["photo", *CONDITIONS]
    cell = resolution * scale
    header = 18
    width = len(columns) * (cell + gap) + gap
    height = header + len(indices) * (cell + gap) + gap
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((gap + j * (cell + gap) + 4, 3), name, fill=(235, 235, 235))
    for i, index in enumerate(indices):
        scan = render_scan(scan_seed(seed, index), RenderConfig(resolution=resolution),
                           scan_id=scan_id_for(seed, index)).scan
        tiles = [scan.photo] + [encode_u8(c, scan) for c in CONDITIONS]
        for j, tile in enumerate(tiles):
            big = Image.fromarray(np.ascontiguousarray(tile)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(big, (gap + j * (cell + gap), header + gap + i * (cell + gap)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/contact_sheet.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(args.seed, resolution=args.resolution, scale=args.scale).save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
