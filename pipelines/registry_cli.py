"""``ctrlora registry list|promote|rollback|resolve`` -- people's handle on the MLflow registry.

The tracking store comes from ``MLFLOW_TRACKING_URI`` (default: ``sqlite:///mlflow.db`` in the
repo, see :mod:`pipelines.settings`). MLflow is imported only when the command runs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="every version of every ctrlora-* model, with aliases and tags")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p = sub.add_parser("promote", help="move alias champion to VERSION (gated unless --force)")
    p.add_argument("condition")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="skip the gate")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="params.yaml whose 'register.gate' is applied (default: ./params.yaml)")
    p = sub.add_parser("rollback", help="move alias champion back to the previous champion")
    p.add_argument("condition")
    p = sub.add_parser("resolve", help="download a models:/ URI and print its local directories")
    p.add_argument("uri", help="models:/ctrlora-<condition>@<alias> or models:/ctrlora-<c>/<version>")
    p.add_argument("--dst", type=Path, default=None, help="download into this folder")


def _print_rows(rows: list[dict]) -> None:
    if not rows:
        print("no ctrlora-* models registered")
        return
    head = f"{'model':<24} {'ver':>4} {'aliases':<20} {'dataset_hash':<14} {'metrics':<28} gate"
    print(head)
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items())[:3])
        print(f"{r['model']:<24} {r['version']:>4} {','.join(r['aliases']) or '-':<20} "
              f"{(r['dataset_hash'] or '-')[:12]:<14} {metrics:<28} "
              f"{r['gate'] or '-'}: {r['gate_reason'] or ''}")


def run(args) -> int:
    import sys

    from pipelines import registry
    from pipelines.register import register_params

    try:
        if args.registry_command == "list":
            rows = registry.list_models()
            print(json.dumps(rows, indent=1)) if args.json else _print_rows(rows)
            return 0
        if args.registry_command == "promote":
            gate = register_params(args.params.resolve().parent)["gate"] if args.params.is_file() \
                else None
            res = registry.promote(args.condition, args.version, force=args.force, gate=gate)
            verb = "promoted to champion" if res.promoted else "NOT promoted (now challenger)"
            print(f"{registry.model_name(args.condition)} v{res.version} {verb}: {res.reason}")
            return 0 if res.promoted else 1
        if args.registry_command == "rollback":
            res = registry.rollback(args.condition)
            print(f"{registry.model_name(args.condition)}: champion v{res.previous} -> v{res.version}")
            return 0
        if args.registry_command == "resolve":
            r = registry.resolve_adapter_uri(args.uri, args.dst)
            print(json.dumps({"model": r.model_name, "version": r.version, "condition": r.condition,
                              "backbone": str(r.backbone), "base": str(r.base),
                              "adapter": str(r.adapter)}, indent=1))
            return 0
    except registry.RegistryError as exc:
        print(f"ctrlora registry {args.registry_command}: {exc}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown registry action {args.registry_command!r}")
