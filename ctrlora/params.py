"""The project's ``params.yaml``, found from the repository rather than the working directory.

The library takes explicit arguments; this reader is for the few entry points whose defaults
*are* the project's configuration (e.g. ``ctrlora sizes --preset tiny`` describes the tiny
backbone that ``params.yaml`` ``backbone.tiny`` configures). It is the project's one params
reader: the MLOps shell (``pipelines.settings``) reads through it too.

:func:`checked_section` is the key check every ``from_params`` builder of a library config
applies to its section: every key present, none unknown.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

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


def read_sections(*sections: str, path: str | Path | None = None) -> Any:
    """Top-level ``sections`` of the params file (``path``, or :func:`find_params_file`): the one
    section itself when one is asked, else a dict keyed by section. A missing section is a
    ``KeyError`` naming the file and the sections it lacks."""
    path = Path(path) if path is not None else find_params_file()
    params = load_params(path)
    missing = [s for s in sections if s not in params]
    if missing:
        raise KeyError(f"{path}: missing section(s) {missing}; present: {sorted(params)}")
    if len(sections) == 1:
        return params[sections[0]]
    return {s: params[s] for s in sections}


class ParamsKeyError(KeyError, ValueError):
    """A params section with a key too many or too few. A ``KeyError`` (what a missing key
    always was) and a ``ValueError`` (what a bad setting is); its text is the message as written."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def checked_section(where: str, section: Any, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    """``section`` (params ``where``, e.g. ``"evaluate"`` or ``"backbone.vae"``) as a dict, refused
    unless it holds every key of ``required`` and nothing beyond ``required`` + ``optional``: a typo
    would otherwise run with a default silently, and a missing key would fall back to one."""
    required, optional = list(required), list(optional)
    if not isinstance(section, Mapping):
        raise ParamsKeyError(f"params {where}: expected a mapping with keys {required}, got "
                             f"{type(section).__name__}")
    missing = [k for k in required if k not in section]
    unknown = sorted(str(k) for k in set(section) - set(required) - set(optional))
    if missing or unknown:
        parts = ([f"missing key(s) {missing}"] if missing else []) + ([f"unknown key(s) {unknown}"] if unknown else [])
        raise ParamsKeyError(f"params {where}: {'; '.join(parts)} (the section holds {required}"
                             f"{f' and may hold {optional}' if optional else ''})")
    return dict(section)
