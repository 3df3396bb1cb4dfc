"""The DVC graph's code dependencies are complete: every Python module a stage imports (directly or
through other project modules, at any depth, including imports inside functions) is listed in
that stage's ``deps``, and nothing listed is stale. Without this, editing a module a stage uses
leaves ``dvc repro`` reporting everything up to date."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines import dvc_deps

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", [r for r in dvc_deps.DVC_FILES if (REPO / r).is_file()])
def test_every_stage_lists_exactly_the_code_it_runs(rel):
    changes = dvc_deps.sync(REPO / rel, write=False)
    assert not changes, "run `python -m pipelines.dvc_deps`:\n" + "\n".join(changes)


def test_import_walker_sees_function_level_relative_and_transitive_imports():
    found = {f.relative_to(REPO).as_posix() for f in dvc_deps.imports_of(REPO / "pipelines" / "backbone.py")}
    assert "ctrlora/training/backbone.py" in found  # imported inside a function
    reach = {f.relative_to(REPO).as_posix() for f in dvc_deps.closure(REPO / "pipelines" / "backbone.py")}
    assert "ctrlora/training/loop.py" in reach  # through ctrlora.training.backbone
    assert "ctrlora/evaluation/metrics.py" in reach  # a relative or absolute import in evaluation


def test_sync_adds_a_missing_module_and_drops_a_stale_one(tmp_path):
    root = tmp_path / "repo"
    for pkg in ("ctrlora", "pipelines"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  backbone:\n"
        "    cmd: .venv/bin/python -m pipelines.backbone\n"
        "    deps:\n"
        "      - pipelines/backbone.py\n"
        "      - ctrlora/data/ingest.py   # stale: backbone never imports it\n"
        "      - data/prepared/photos     # data deps stay\n"
        "    outs:\n"
        "      - models/backbone\n")
    changes = dvc_deps.sync(root / "dvc.yaml", root=root)
    assert any(c.endswith("+ ctrlora/training/loop.py") for c in changes)
    assert any(c.endswith("- ctrlora/data/ingest.py") for c in changes)
    text = (root / "dvc.yaml").read_text()
    assert "ctrlora/training/loop.py" in text and "ingest.py" not in text
    assert "data/prepared/photos     # data deps stay" in text and "models/backbone" in text
    assert dvc_deps.sync(root / "dvc.yaml", root=root) == []  # idempotent
