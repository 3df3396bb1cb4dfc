"""Ingest landed scans: data/incoming/<id>/ (complete once READY exists) -> data/scans/ or
data/quarantine/<id>/ with reason.json. Run it before ``dvc repro`` when new scans have landed:
``.venv/bin/python -m pipelines.ingest [--data DIR]``. Prints a summary; exit code 0 even when
scans were quarantined (that is the expected outcome for bad scans), 2 on a usage problem."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
import yaml

from ctrlora.data.contract import ContractConfig
from ctrlora.data.ingest import IngestConfig, ingest

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="data folder (default: data/)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args(argv)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]
    report = ingest(IngestConfig.under(args.data, ContractConfig(resolution=int(p["resolution"]))))
    if args.json:
        print(json.dumps({"accepted": report.accepted, "quarantined": report.quarantined,
                          "violations": report.violations, "pending": report.pending, "ignored": report.ignored}, indent=1))
    else:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
