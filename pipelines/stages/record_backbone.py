"""DVC stage ``backbone`` (params: ``backbone.preset``, ``backbone.sd15_path``): record which
backbone the production graph reads, in ``<paths.backbone>/backbone.json`` (preset, where it lies,
content hash). Nothing is trained here: later stages load the recorded directory through
:func:`pipelines.stages.common.resolve_backbone`.

* ``preset: tiny`` — the embedded default's backbone, pretrained by the foundation graph and
  committed (``paths.foundation.backbone``; ``make foundation`` rebuilds it).
* ``preset: sd15`` — a local Stable Diffusion 1.5 directory (``sd15_path``; nothing is downloaded).
  A single-file checkpoint there is refused with the command that converts it once
  (``ctrlora import-sd15``, :mod:`ctrlora.models.single_file`).

The record names the directory relative to itself when it lies inside the repository, and as
written in params.yaml otherwise (``~`` kept), so the tracked output holds nothing specific to
one machine; its hash ties every later stage to the backbone's content.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
from pipelines.settings import REPO_ROOT
from pipelines.stages.common import RECORD_NAME, artefact_paths, read_params, timed_stage

PRESETS = ("tiny", "sd15")


def source_of(p: dict, paths: dict) -> tuple[Path, str]:
    """The backbone directory the preset names, and how the record writes it."""
    if p["preset"] == "tiny":
        src = Path(paths["foundation"]["backbone"])
        return src, ""
    if p["preset"] == "sd15":
        written = str(p["sd15_path"])
        src = Path(written).expanduser()
        return (src if src.is_absolute() else REPO_ROOT / src), written
    raise SystemExit(f"params.yaml backbone.preset must be one of {PRESETS}, got {p['preset']!r}")


def record(p: dict, paths: dict, out: Path) -> dict:
    from ctrlora.models.backbone import backbone_hash, load_backbone

    src, written = source_of(p, paths)
    if p["preset"] == "sd15" and src.is_file():
        # one .safetensors / .ckpt holds no tokenizer, and converting 4 GB on every run is waste:
        # the user converts it once, outside the graph, and the graph reads the folder
        raise SystemExit(
            f"backbone (sd15): params.yaml backbone.sd15_path names a single-file checkpoint ({written}); the graph "
            "reads a diffusers-layout folder. Convert it once:\n"
            f"  ctrlora import-sd15 {written} --tokenizer <SD 1.5 tokenizer folder> --out <new folder>\n"
            "then set backbone.sd15_path to that folder (docs/models.md, \"SD 1.5 as one file\")")
    hint = ("run `make foundation` to rebuild the shipped tiny backbone" if p["preset"] == "tiny"
            else "params.yaml backbone.sd15_path must name a local diffusers-layout SD 1.5 directory")
    try:
        load_backbone(src)  # raises, listing what is missing
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f"backbone ({p['preset']}): {e}\n{hint}") from e
    src = src.resolve()
    inside = src.is_relative_to(REPO_ROOT.resolve())
    where = os.path.relpath(src, out.resolve()) if inside else written
    rec = {"preset": p["preset"], "path": where.replace(os.sep, "/"), "hash": backbone_hash(src)}
    out.mkdir(parents=True)
    (out / RECORD_NAME).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def main() -> int:
    p, paths = read_params("backbone"), artefact_paths()
    out = paths["backbone"]
    with timed_stage("backbone"):
        if out.exists():
            shutil.rmtree(out)
        rec = record(p, paths, out)
        print(f"[backbone] {rec['preset']}: {rec['path']} (sha256 {rec['hash'][:16]}) -> {out / RECORD_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
