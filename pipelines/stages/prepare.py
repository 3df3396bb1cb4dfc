"""DVC stage ``prepare``: ``paths.rendered`` + ``paths.scans`` (the synthetic and the ingested scans)
-> ``paths.prepared`` (params: ``prepare``)."""
from __future__ import annotations

import json
import sys

import pipelines  # noqa: F401  (tool defaults)
from pipelines.stages.common import artefact_paths, read_params, timed_stage

from ctrlora.data.prepare import PrepareConfig, prepare


def main() -> int:
    p = read_params("prepare")
    with timed_stage("prepare"):
        return _run(p, artefact_paths())


def _run(p: dict, paths: dict) -> int:
    result = prepare(PrepareConfig.from_params(p, sources=(paths["rendered"], paths["scans"]), out=paths["prepared"],
                                               data_root=paths["data"]))
    print(json.dumps({"scans": result.scans, "train": result.train, "validation": result.validation, "test": result.test,
                      "seconds": result.seconds, "sources": result.sources, "hashes": result.hashes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
