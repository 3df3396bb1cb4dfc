"""``ctrlora import-clinic``: land a clinic's export (photographs, COCO or PNG masks, depth and
normal maps, captions) as clinic scans; then run the ingestion."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", type=Path, help="the export folder (photos/, annotations.json, masks/, depth/, "
                                                   "normal/, captions.csv; docs/data.md)")
    parser.add_argument("--out", type=Path, default=Path("data/incoming"),
                        help="landing folder, one scan folder per photograph (default: data/incoming)")
    parser.add_argument("--quarantine", type=Path, default=None,
                        help="where refused photographs go with their reason.json (default: quarantine/ beside --out)")
    parser.add_argument("--params", type=Path, default=None,
                        help="params file whose `clinic` section, `labels` table and `prepare.resolution` apply "
                             "(default: the project's params.yaml)")
    parser.add_argument("--resolution", type=int, default=None, help="override prepare.resolution")
    parser.add_argument("--aspect", choices=("pad", "crop"), default=None, help="override clinic.aspect")


def run(args: argparse.Namespace) -> int:
    from ctrlora.data.clinic import ClinicConfig, import_clinic
    from ctrlora.data.labels import table_from_params
    from ctrlora.params import load_params

    params = load_params(args.params)
    section = dict(params.get("clinic") or {})
    if args.aspect is not None:
        section["aspect"] = args.aspect
    resolution = args.resolution if args.resolution is not None else int(params["prepare"]["resolution"])
    cfg = ClinicConfig.from_params(section, resolution, labels=table_from_params(params))  # one file for both
    quarantine = args.quarantine if args.quarantine is not None else args.out.parent / "quarantine"
    report = import_clinic(args.export, args.out, quarantine, cfg)
    print(json.dumps(report.as_dict(), indent=1, sort_keys=True))
    return 0
