"""DVC stage ``render``: the embedded synthetic data set -> data/rendered (params: ``render``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
from pipelines.stage import read_params, timed_stage

from ctrlora.data.render import DatasetConfig, render_dataset

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = read_params("render")
    with timed_stage("render"):
        return _run(p)


def _run(p: dict) -> int:
    stats = render_dataset(DatasetConfig(out=ROOT / p["out"], n=int(p["n"]), seed=int(p["seed"]),
                                         resolution=int(p["resolution"]), workers=int(p["workers"])))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
