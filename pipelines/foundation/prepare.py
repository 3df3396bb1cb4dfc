"""Foundation stage ``prepare`` (params: ``prepare``): the rendered scans alone (``paths.rendered``)
-> ``paths.foundation.prepared``, with the production graph's split rule, resolution and
conditions.

Landed clinic scans stay out: the foundation depends on the embedded corpus only, so a landing
never changes it. The split is a function of the scan id, so every rendered scan falls in the same
split here as in the production ``prepare``: the foundation trains on no scan the production
graph evaluates on."""
from __future__ import annotations

import json
import sys

import pipelines  # noqa: F401  (tool defaults)
from pipelines.stages.common import artefact_paths, read_params, timed_stage

from ctrlora.data.contract import ContractConfig
from ctrlora.data.prepare import PrepareConfig, prepare


def main() -> int:
    p, paths = read_params("prepare"), artefact_paths()
    with timed_stage("foundation/prepare"):
        result = prepare(PrepareConfig(
            sources=(paths["rendered"],), out=paths["foundation"]["prepared"], data_root=paths["data"],
            test_fraction=float(p["test_fraction"]), validation_fraction=float(p["validation_fraction"]),
            conditions=tuple(p["conditions"]), contract=ContractConfig(resolution=int(p["resolution"])),
            workers=int(p["workers"])))
        print(json.dumps({"scans": result.scans, "train": result.train, "validation": result.validation,
                          "test": result.test, "seconds": result.seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
