"""DVC stage ``prepare``: data/rendered + data/scans -> data/prepared (params: ``prepare``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
from pipelines.stage import read_params, timed_stage

from ctrlora.data.contract import ContractConfig
from ctrlora.data.prepare import PrepareConfig, prepare

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = read_params("prepare")
    with timed_stage("prepare"):
        return _run(p)


def _run(p: dict) -> int:
    result = prepare(PrepareConfig(
        sources=tuple(ROOT / s for s in p["sources"]), out=ROOT / p["out"], data_root=ROOT / "data",
        test_fraction=float(p["test_fraction"]),
        validation_fraction=float(p.get("validation_fraction", 0.0)), conditions=tuple(p["conditions"]),
        contract=ContractConfig(resolution=int(p["resolution"])), workers=int(p["workers"])))
    print(json.dumps({"scans": result.scans, "train": result.train, "validation": result.validation, "test": result.test,
                      "seconds": result.seconds, "sources": result.sources, "hashes": result.hashes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
