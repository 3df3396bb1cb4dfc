"""Ingest landed scans: ``paths.incoming``/<id>/ (complete once READY exists) -> ``paths.scans`` or
``paths.quarantine``/<id>/ with reason.json. Run it before ``dvc repro`` when new scans have landed:
``.venv/bin/python -m pipelines.orchestration.ingest [--repo DIR | --data DIR]``. Prints a summary; exit code 0 even when
scans were quarantined (that is the expected outcome for bad scans), 2 on a usage problem."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)

from ctrlora.data.contract import ContractConfig
from ctrlora.data.ingest import IngestConfig, ingest
from pipelines.settings import PARAMS_ENV, PARAMS_FILE, REPO_ROOT, params_path, read_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--repo", type=Path, default=REPO_ROOT,
                       help=f"project whose params.yaml `paths` folders are used (default: {REPO_ROOT})")
    where.add_argument("--data", type=Path, help="a data folder holding incoming/, scans/ and quarantine/")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args(argv)
    # --repo: that project's params.yaml (its resolution and its `paths`), unless $CTRLORA_PARAMS
    # names another file, as for the stage entries
    params_file = (args.repo / PARAMS_FILE) if args.data is None and not os.environ.get(PARAMS_ENV) \
        else params_path()
    contract = ContractConfig(resolution=int(read_params("prepare", path=params_file)["resolution"]))
    if args.data is not None:
        cfg = IngestConfig.under(args.data, contract)
    else:
        paths = read_params("paths", path=params_file)
        cfg = IngestConfig(*(args.repo / paths[k] for k in ("data", "incoming", "scans", "quarantine")), contract)
    report = ingest(cfg)
    if args.json:
        print(json.dumps({"accepted": report.accepted, "quarantined": report.quarantined,
                          "violations": report.violations, "pending": report.pending, "ignored": report.ignored}, indent=1))
    else:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
