"""Keep the code dependencies of every DVC stage complete: ``python -m pipelines.orchestration.dvc_deps`` rewrites
the ``.py`` entries of each stage's ``deps`` in ``dvc.yaml`` (and ``research/dvc.yaml``, ``foundation/dvc.yaml``) to exactly
the project modules the stage's entry point imports, directly or through other project modules,
at any depth (imports inside functions included). ``--check`` only reports and exits 1 on a
difference (the test suite runs the same check).

It also writes the per-condition data lists DVC cannot generate (one out or dep per condition
folder): after a comment ``# conditions from: <params key> [+ <params key>]``, the next run of
``- ${paths.prepared}/conditions/<name>`` lines becomes exactly the conditions those params.yaml
lists name, in order, duplicates dropped; every name must be an entry of params ``conditions``.

The edit is textual: only lines of the form ``- <path>.py`` inside a stage's ``deps`` and the
condition runs change, so comments, other data dependencies and layout stay as written.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from pathlib import Path

from pipelines.settings import REPO_ROOT

PACKAGES = ("ctrlora", "pipelines")
DVC_FILES = ("dvc.yaml", "research/dvc.yaml", "foundation/dvc.yaml", "utility/dvc.yaml", "efficiency/dvc.yaml")


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _package_of(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # a module's package; for __init__.py the package itself (drop "__init__")


def imports_of(path: Path, root: Path = REPO_ROOT) -> set[Path]:
    """Project modules imported anywhere in ``path`` (relative imports resolved; importing
    ``a.b.c`` also counts ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path, root)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                prefix = package[: len(package) - node.level + 1]
                mod = ".".join(prefix + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    found = set()
    for n in names:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:k]), root)
            if f is not None:
                found.add(f)
    return found


def closure(start: Path, root: Path = REPO_ROOT) -> set[Path]:
    """``start`` and every project module it reaches through imports."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(imports_of(f, root) - seen)
    return seen


def stage_code(cmd: str, root: Path = REPO_ROOT) -> set[Path] | None:
    """The project modules a stage command ``... -m pipelines.x ...`` runs (``__init__.py``
    files left out: they hold no stage logic), or None for other commands."""
    m = re.search(r"-m (pipelines(?:\.\w+)+)", cmd)
    if not m:
        return None
    entry = module_file(m.group(1), root)
    if entry is None:
        raise FileNotFoundError(f"stage command {cmd!r}: module {m.group(1)} not found")
    return {f for f in closure(entry, root) if f.name != "__init__.py"}


_DEP_PY = re.compile(r"^(\s+)- ((?:\.\./)*(?:ctrlora|pipelines)/[\w/]+\.py)\s*(#.*)?$")


_CONDITIONS_FROM = re.compile(r"^\s*# conditions from: ([\w.]+(?:\s*\+\s*[\w.]+)*)\s*$")
_CONDITION_LINE = re.compile(r"^(\s+)- \$\{paths\.prepared\}/conditions/(\w+)\s*(#.*)?$")


def _params_list(params: dict, dotted: str) -> list[str]:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"params.yaml has no {dotted!r}")
        node = node[key]
    if not isinstance(node, list) or not all(isinstance(c, str) for c in node):
        raise ValueError(f"params.yaml {dotted} is not a list of condition names")
    return node


def sync_conditions(lines: list[str], params_file: Path) -> tuple[list[str], list[str]]:
    """Rewrite every ``# conditions from:`` run of ``lines`` from ``params_file``; (lines, diff)."""
    marks = [i for i, ln in enumerate(lines) if _CONDITIONS_FROM.match(ln)]
    if not marks:
        return lines, []
    import yaml

    from ctrlora.data.conditions import ConditionTable

    params = yaml.safe_load(params_file.read_text()) or {}
    table = ConditionTable(params.get("conditions"))
    diff: list[str] = []
    for m in reversed(marks):  # bottom up: earlier indices stay valid
        keys = [k.strip() for k in _CONDITIONS_FROM.match(lines[m]).group(1).split("+")]
        want = list(dict.fromkeys(c for k in keys for c in _params_list(params, k)))
        unknown = [c for c in want if c not in table]
        if unknown:
            raise ValueError(f"params {' + '.join(keys)} name {unknown}, which params conditions does not declare")
        start = next((i for i in range(m + 1, len(lines)) if _CONDITION_LINE.match(lines[i])), None)
        if start is None:
            raise ValueError(f"line {m + 1}: no `- ${{paths.prepared}}/conditions/<name>` line follows "
                             f"the marker (keep at least one)")
        end = start
        while end < len(lines) and _CONDITION_LINE.match(lines[end]):
            end += 1
        indent = _CONDITION_LINE.match(lines[start]).group(1)
        have = [_CONDITION_LINE.match(ln).group(2) for ln in lines[start:end]]
        if have != want:
            diff.append(f"conditions from {' + '.join(keys)}: {have} -> {want}")
            lines = lines[:start] + [f"{indent}- ${{paths.prepared}}/conditions/{c}" for c in want] + lines[end:]
    return lines, diff


def sync(dvc_file: Path, root: Path = REPO_ROOT, write: bool = True) -> list[str]:
    """Make every stage's ``.py`` deps and every condition run exact; returns a line per change."""
    import yaml

    doc = yaml.safe_load(dvc_file.read_text())
    lines = dvc_file.read_text().splitlines()
    lines, diff = sync_conditions(lines, root / "params.yaml")
    changes: list[str] = [f"{dvc_file.relative_to(root)}: {d}" for d in diff]
    for name, stage in doc.get("stages", {}).items():
        body = stage.get("do", stage)
        needed = stage_code(body["cmd"], root)
        if needed is None:
            continue
        wdir = (dvc_file.parent / body.get("wdir", ".")).resolve()  # deps are relative to it
        want = sorted(os.path.relpath(f, wdir).replace(os.sep, "/") for f in needed)
        lines, diff = _rewrite_stage(lines, name, want)
        changes += [f"{dvc_file.relative_to(root)}:{name}: {d}" for d in diff]
    if write and changes:
        dvc_file.write_text("\n".join(lines) + "\n")
    return changes


def _rewrite_stage(lines: list[str], name: str, want: list[str]) -> tuple[list[str], list[str]]:
    start = next(i for i, ln in enumerate(lines) if re.match(rf"^  {re.escape(name)}:\s*$", ln))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^  \S", lines[i]) or re.match(r"^\S", lines[i])),
               len(lines))
    deps_at = next(i for i in range(start, end) if lines[i].strip() == "deps:")
    indent = len(lines[deps_at]) - len(lines[deps_at].lstrip()) + 2
    block_end = next((i for i in range(deps_at + 1, end)
                      if lines[i].strip() and (len(lines[i]) - len(lines[i].lstrip())) < indent), end)
    have = [m.group(2) for ln in lines[deps_at + 1:block_end] if (m := _DEP_PY.match(ln))]
    kept = [ln for ln in lines[deps_at + 1:block_end] if not _DEP_PY.match(ln)]
    new_block = [" " * indent + f"- {p}" for p in want] + kept
    diff = [f"+ {p}" for p in want if p not in have] + [f"- {p}" for p in have if p not in want]
    return lines[:deps_at + 1] + new_block + lines[block_end:], diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report differences and exit 1, change nothing")
    args = ap.parse_args(argv)
    changes = []
    for rel in DVC_FILES:
        if (REPO_ROOT / rel).is_file():
            changes += sync(REPO_ROOT / rel, write=not args.check)
    for c in changes:
        print(c)
    if args.check and changes:
        print("deps out of date (code or condition lists): run `python -m pipelines.orchestration.dvc_deps`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
