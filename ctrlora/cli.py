"""The ctrlora command: the library's own tools, on local folders and files.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; a module keeps its heavy imports inside ``run``, so building the parser
stays cheap. Commands that talk to the MLflow registry belong to the MLOps shell
(``ctrlora-ops``, in :mod:`pipelines`), not to the library.
"""
from __future__ import annotations

import argparse
import sys

from ctrlora import generate_cli
from ctrlora.data import render_cli
from ctrlora.models import convert, sizes

COMMANDS = {
    # name: (module, one-line help)
    "render": (render_cli, "render synthetic dental scans"),
    "sizes": (sizes, "print parameter counts of the base ControlNet and one adapter as JSON"),
    "convert": (convert, "convert published ldm-format CtrLoRA checkpoints"),
    "generate": (generate_cli, "generate images from condition images with adapter folders"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_run=module.run)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
