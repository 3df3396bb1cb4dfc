"""The library sits below the shell: ``ctrlora`` imports nothing from ``pipelines``, MLflow,
Prefect or DVC -- neither by an import statement (at module level or inside a function) nor by a
module name handed to importlib as a string."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ctrlora

SHELL = ("pipelines", "mlflow", "prefect", "dvc")
LIBRARY = Path(ctrlora.__file__).resolve().parent
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _is_shell(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in SHELL


def _shell_references(path: Path) -> list[str]:
    """``line: what`` for every import of a shell package and every string naming one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and MODULE_NAME.match(node.value) and node.value not in ("dvc.lock", "dvc.yaml"):
            names = [node.value]  # a module name that importlib could be handed
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if _is_shell(name)]
    return found


def test_library_sources_name_no_shell_package():
    offenders = {str(p.relative_to(LIBRARY.parent)): refs for p in sorted(LIBRARY.rglob("*.py"))
                 if (refs := _shell_references(p))}
    assert not offenders, f"ctrlora/ reaches into the shell: {offenders}"


# Runs in a fresh interpreter: the shell packages are marked absent in sys.modules (``None``:
# ``import`` raises ModuleNotFoundError and ``importlib.util.find_spec`` answers None, exactly as
# if they were not installed), then every module of ctrlora is imported and its CLI parser built.
IMPORT_ALL = textwrap.dedent("""\
    import importlib, pkgutil, sys
    SHELL = {shell!r}
    for name in list(sys.modules):
        if name.split(".")[0] in SHELL:
            del sys.modules[name]
    for name in SHELL:
        sys.modules[name] = None
    import ctrlora
    names = ["ctrlora"]
    def failed(name):
        raise ImportError(f"cannot import {{name}}")
    for info in pkgutil.walk_packages(ctrlora.__path__, "ctrlora.", onerror=failed):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # importing it would run a command
            continue
        importlib.import_module(info.name)
        names.append(info.name)
    from ctrlora.cli import build_parser
    build_parser()
    leaked = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in SHELL)
    assert not leaked, leaked
    print("IMPORTED", len(names))
    """)


def test_every_library_module_imports_without_the_shell():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL.format(shell=SHELL)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    count = int(proc.stdout.split("IMPORTED")[-1])
    modules = [p for p in LIBRARY.rglob("*.py") if p.name != "__main__.py"]
    assert count >= len(modules)  # every module, packages included
