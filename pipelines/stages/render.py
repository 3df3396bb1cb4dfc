"""DVC stage ``render``: the embedded synthetic data set -> ``paths.rendered`` (params: ``render``)."""
from __future__ import annotations

import json
import sys

import pipelines  # noqa: F401  (tool defaults)
from pipelines.stages.common import artefact_paths, read_params, timed_stage

from ctrlora.data.render import DatasetConfig, render_dataset


def main() -> int:
    p = read_params("render")
    with timed_stage("render"):
        return _run(p, artefact_paths()["rendered"])


def _run(p: dict, out) -> int:
    stats = render_dataset(DatasetConfig.from_params(p, out))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
