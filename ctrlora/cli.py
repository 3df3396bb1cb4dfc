"""The ``ctrlora`` command.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``ctrlora sizes``
never pays for MLflow. Commands that talk to the MLflow registry live in :mod:`pipelines`
(the library itself stays free of DVC / Prefect / MLflow imports).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "render": ("ctrlora.data.render_cli", "render synthetic dental scans"),
    "sizes": ("ctrlora.models.sizes", "print parameter counts of the base ControlNet and one adapter as JSON"),
    "convert": ("ctrlora.models.convert", "convert published ldm-format CtrLoRA checkpoints"),
    "generate": ("ctrlora.generate_cli", "generate images from condition images with adapters"),
    "registry": ("pipelines.registry_cli", "list / promote / roll back adapters in the MLflow registry"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:  # command not built yet in this checkout
            if exc.name is None or not module.startswith(exc.name):
                raise
            p.set_defaults(_missing=str(exc))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"ctrlora {args.command}: not available: {args._missing}", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
