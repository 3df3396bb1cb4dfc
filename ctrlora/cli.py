"""The ctrlora command: the library's own tools, on local folders and files.

Each sub-command lives in its own module (or a namespace of one, as ``export`` in
:mod:`ctrlora.models.convert`) exposing ``add_arguments(parser)`` and ``run(args) -> int``; a module keeps its heavy imports inside ``run``, so building the parser
stays cheap. Commands that talk to the MLflow registry belong to the MLOps shell
(``ctrlora-ops``, in :mod:`pipelines`), not to the library.

Failures end in one line on stderr, ``ctrlora <command>: error: <file>: <what is wrong>``, and
a non-zero exit: 2 for bad input (a missing or unreadable file, a refused pickle, a bad option
value), 1 for anything else; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ctrlora import generate_cli
from ctrlora.data import clinic_cli, render_cli
from ctrlora.models import convert, single_file, sizes

COMMANDS: dict[str, tuple[Any, str]] = {
    # name: (module or namespace with add_arguments / run, one-line help)
    "render": (render_cli, "render synthetic dental scans"),
    "import-clinic": (clinic_cli, "land a clinic's export (photographs, COCO or PNG masks, depth / normal maps, "
                                  "captions) as clinic scans for ingestion"),
    "sizes": (sizes, "print parameter counts of the base ControlNet and one adapter as JSON"),
    "convert": (convert, "convert published ldm-format CtrLoRA checkpoints"),
    "export": (convert.EXPORT_COMMAND, "write a base folder and adapter folders as published-layout CtrLoRA checkpoints"),
    "generate": (generate_cli, "generate images from condition images with adapter folders"),
    "import-sd15": (single_file, "convert a single-file SD 1.5 checkpoint (.safetensors / .ckpt, ldm layout) into the "
                                 "diffusers-layout folder backbone.sd15_path names"),
}


# Errors that mean "the input is wrong" (exit 2); the library raises these with the file named.
INPUT_ERRORS = (generate_cli.GenerateError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError, ValueError, KeyError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrlora", description=__doc__.splitlines()[0])
    debug: dict[str, Any] = dict(action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure")
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", **debug)
        p.set_defaults(_run=module.run)
        module.add_arguments(p)
    return parser


def error_line(exc: BaseException) -> str:
    """One line for ``exc``: its message (a KeyError's without the quotes), lines joined."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = " ".join(part.strip() for part in str(msg).splitlines() if part.strip())
    return text or type(exc).__name__


def _configure_logging() -> None:
    """Show the library's progress messages (``ctrlora.*`` loggers, INFO) on stderr as plain
    lines, unless the host program already configured logging. Other libraries' loggers stay at
    WARNING: accelerate, for one, logs every checkpoint save and load at INFO."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ctrlora").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    debug = getattr(args, "debug", False)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"ctrlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        bad_input = isinstance(exc, INPUT_ERRORS)
        hint = "" if bad_input else f" ({type(exc).__name__}; rerun with --debug for the traceback)"
        print(f"ctrlora {args.command}: error: {error_line(exc)}{hint}", file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
