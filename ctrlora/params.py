"""The project's ``params.yaml``, found from the repository rather than the working directory.

The library takes explicit arguments; this reader is for the few entry points whose defaults
*are* the project's configuration (e.g. ``ctrlora sizes --preset tiny`` describes the tiny
backbone that ``params.yaml`` ``backbone.tiny`` configures).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"
PARAMS_ENV = "CTRLORA_PARAMS"  # names another params file (tests, experiments)


def find_params_file(start: str | Path | None = None) -> Path:
    """The params file: ``$CTRLORA_PARAMS`` when set; else ``params.yaml`` of the checkout this
    package lives in; else of ``start`` (default: the working directory) or its nearest parent
    that has one."""
    named = os.environ.get(PARAMS_ENV)
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(f"${PARAMS_ENV} names {named}, which is not a file")
        return Path(named)
    package_root = Path(__file__).resolve().parent.parent
    here = Path(start if start is not None else Path.cwd()).resolve()
    candidates = [package_root, here, *here.parents]
    for folder in candidates:
        if (folder / PARAMS_FILE).is_file():
            return folder / PARAMS_FILE
    raise FileNotFoundError(f"no {PARAMS_FILE} found: looked in {package_root} (the checkout of the ctrlora "
                            f"package) and in {here} and its parents; pass the file explicitly")


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """The whole params file (``path``, or :func:`find_params_file`)."""
    path = Path(path) if path is not None else find_params_file()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such params file")
    return yaml.safe_load(path.read_text()) or {}


def params_section(dotted: str, path: str | Path | None = None) -> Any:
    """One section of the params file by dotted name, e.g. ``"backbone.tiny"``."""
    node: Any = load_params(path)
    where: list[str] = []
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            found = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"params file has no {'.'.join(where + [key])!r} (under {'.'.join(where) or 'top level'}: "
                           f"{found})")
        node = node[key]
        where.append(key)
    return node
