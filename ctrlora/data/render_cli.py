"""``ctrlora render``: render a synthetic dental data set."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per scan)")
    parser.add_argument("--n", type=int, default=2400, help="number of scans (default 2400)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="render processes (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ctrlora.data.render import DatasetConfig, render_dataset

    stats = render_dataset(DatasetConfig(out=args.out, n=args.n, seed=args.seed, resolution=args.resolution,
                                         workers=args.workers, progress=not args.no_progress))
    print(json.dumps(stats))
    return 0
