"""The DVC graph's code dependencies are complete: every Python module a stage imports (directly or
through other project modules, at any depth, including imports inside functions) is listed in
that stage's ``deps``, and nothing listed is stale. Without this, editing a module a stage uses
leaves ``dvc repro`` reporting everything up to date."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.orchestration import dvc_deps

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", [r for r in dvc_deps.DVC_FILES if (REPO / r).is_file()])
def test_every_stage_lists_exactly_the_code_it_runs(rel):
    changes = dvc_deps.sync(REPO / rel, write=False)
    assert not changes, "run `python -m pipelines.orchestration.dvc_deps`:\n" + "\n".join(changes)


def test_import_walker_sees_function_level_relative_and_transitive_imports():
    entry = REPO / "pipelines" / "foundation" / "pretrain_backbone.py"
    found = {f.relative_to(REPO).as_posix() for f in dvc_deps.imports_of(entry)}
    assert "ctrlora/training/pretrain.py" in found  # imported inside a function
    reach = {f.relative_to(REPO).as_posix() for f in dvc_deps.closure(entry)}
    assert "ctrlora/training/loop.py" in reach  # through ctrlora.training.pretrain
    assert "ctrlora/evaluation/metrics.py" in reach  # a relative or absolute import in evaluation


def test_sync_adds_a_missing_module_and_drops_a_stale_one(tmp_path):
    root = tmp_path / "repo"
    for pkg in ("ctrlora", "pipelines"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  backbone:\n"
        "    cmd: .venv/bin/python -m pipelines.foundation.pretrain_backbone\n"
        "    deps:\n"
        "      - pipelines/foundation/pretrain_backbone.py\n"
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


def test_editing_a_transitively_imported_module_reruns_the_stage(tmp_path):
    """End to end through a real DVC repo: deps written by ``dvc_deps``, a module two imports away
    from the stage's entry edited, ``dvc status`` names the stage and ``dvc repro`` reruns it."""
    import subprocess
    import sys

    root = tmp_path / "repo"
    (root / "pipelines").mkdir(parents=True)
    (root / "ctrlora").mkdir()
    for pkg in ("pipelines", "ctrlora"):
        (root / pkg / "__init__.py").write_text("")
    (root / "ctrlora" / "shade.py").write_text("LEVEL = 1\n")
    (root / "ctrlora" / "render.py").write_text("def value():\n    from ctrlora.shade import LEVEL\n    return LEVEL\n")
    (root / "pipelines" / "make_out.py").write_text(
        "from pathlib import Path\nfrom ctrlora.render import value\nPath('out.txt').write_text(str(value()))\n")
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  make_out:\n"
        f"    cmd: {sys.executable} -m pipelines.make_out\n"
        "    deps:\n"
        "      - pipelines/make_out.py\n"
        "    outs:\n"
        "      - out.txt\n")
    changes = dvc_deps.sync(root / "dvc.yaml", root=root)
    assert sorted(c.split("+ ")[-1] for c in changes) == ["ctrlora/render.py", "ctrlora/shade.py"]
    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*args: str) -> str:
        done = subprocess.run([dvc, *args], cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("init", "--no-scm", "-q")
    run("config", "core.analytics", "false")
    run("repro", "-q")
    assert (root / "out.txt").read_text() == "1"
    assert "up to date" in run("status").lower()
    (root / "ctrlora" / "shade.py").write_text("LEVEL = 2\n")
    status = run("status")
    assert "make_out" in status and "ctrlora/shade.py" in status
    run("repro", "-q")
    assert (root / "out.txt").read_text() == "2"


@pytest.mark.parametrize("rel", ["dvc.lock", "research/dvc.lock", "foundation/dvc.lock"])
def test_no_lock_entry_outlives_its_stage(rel):
    """DVC never prunes dvc.lock: a stage removed from (or moved out of) a graph keeps its old entry,
    and the retrain's catch-up check would read its stale hashes as scans never trained on."""
    import yaml

    lock_file = REPO / rel
    if not lock_file.is_file():
        pytest.skip(f"{rel} not committed")
    graph = yaml.safe_load((lock_file.parent / "dvc.yaml").read_text())["stages"]
    names = set(graph)  # a foreach stage's entries are <name>@<item>
    locked = yaml.safe_load(lock_file.read_text())["stages"]
    stale = [s for s in locked if s.split("@", 1)[0] not in names]
    assert not stale, f"{rel}: entries of stages that no longer exist: {stale} (delete them)"


def test_sync_writes_the_condition_lists_from_params(tmp_path):
    """The per-condition data lists DVC cannot generate follow params: a condition added to
    ``train_adapter.conditions`` (and declared in ``conditions``) gains its folder; ``--check``
    sees the stale file; an undeclared name is refused."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["conditions"]["blur_strong"] = {"kind": "derived", "op": "blur", "sigma": 4.0, "metric": "ssim",
                                           "detector": "none"}
    params["train_adapter"]["conditions"] = ["lighting", "blur_strong", "canny"]  # canny: already a base one
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    graph = ("stages:\n"
             "  embed:\n"
             "    cmd: echo embed\n"
             "    deps:\n"
             "      # conditions from: train_base.conditions + train_adapter.conditions\n"
             "      - ${paths.prepared}/photos\n"
             "      - ${paths.prepared}/conditions/segmentation\n"
             "      - ${paths.prepared}/conditions/lighting\n"
             "      - ${paths.embed}\n")
    (tmp_path / "dvc.yaml").write_text(graph)
    changes = dvc_deps.sync(tmp_path / "dvc.yaml", root=tmp_path, write=False)
    assert len(changes) == 1 and "blur_strong" in changes[0] and (tmp_path / "dvc.yaml").read_text() == graph
    dvc_deps.sync(tmp_path / "dvc.yaml", root=tmp_path)
    want = ["segmentation", "depth", "canny", "palette", "lighting", "blur_strong"]
    assert (tmp_path / "dvc.yaml").read_text() == graph.replace(
        "      - ${paths.prepared}/conditions/segmentation\n      - ${paths.prepared}/conditions/lighting\n",
        "".join(f"      - ${{paths.prepared}}/conditions/{c}\n" for c in want))
    assert dvc_deps.sync(tmp_path / "dvc.yaml", root=tmp_path) == []  # idempotent
    params["train_adapter"]["conditions"] = ["sketch"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ValueError, match=r"\['sketch'\], which params conditions does not declare"):
        dvc_deps.sync(tmp_path / "dvc.yaml", root=tmp_path)
