"""DVC stage ``train_base`` (params: ``train_base``): the Base ControlNet, trained over the base
conditions with one LoRA per condition; writes ``paths.base`` (the base, diffusers format) and
``<paths.base>/adapters/<c>`` (each base condition's adapter: its LoRA + the base's zero convs /
norms, as the reference ships them).

``train_base.source: imported`` trains no base: the published-layout checkpoint
``train_base.imported`` (``.safetensors`` / ``.ckpt``, e.g. the paper's 700k-pair base) is
converted by :mod:`ctrlora.models.convert` into ``paths.base`` (the layout trained mode writes)
and each base condition gets an adapter trained on that **frozen** base, as a new condition's
adapter is (:func:`ctrlora.training.controlnet.train_condition`, ``mode="adapter"``), with this
section's ``rank`` / ``prompt_dropout`` / ``train`` and ``imported_max_pairs``. Where the base came
from is recorded in ``<paths.base>/base_source.json`` (source, the checkpoint's sha256 and format,
the converted base's hash) — never the checkpoint's path or file name, which are machine-specific."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pipelines  # noqa: F401  (tool defaults)
import torch

from ctrlora.data.files import sha256_file
from pipelines.settings import BASE_ADAPTERS, REPO_ROOT
from pipelines.stages.common import (artefact_paths, checkpoint_dir, clear_checkpoints, main_process,
                                     read_params, resolve_backbone, timed_stage, write_curve)

SOURCES = ("trained", "imported")
# the keys of params train_base this entry reads itself, beside the recipe (train, prompt_dropout)
# that ControlNetTrainConfig.from_params reads: the section holds exactly these
OWN_KEYS = ("conditions", "rank", "condition_shares", "source", "imported", "imported_max_pairs")
SOURCE_RECORD = "base_source.json"  # written in imported mode only (trained mode's outputs stay as they were)


def base_source(p: dict[str, Any]) -> str:
    """``train_base.source``, checked."""
    source = p["source"]
    if source not in SOURCES:
        raise ValueError(f"params train_base.source must be one of {list(SOURCES)}, got {source!r}")
    return str(source)


def imported_checkpoint(p: dict[str, Any]) -> Path:
    """``train_base.imported`` resolved against the repo root (an absolute path stays as it is),
    checked to be an existing ``.safetensors`` / ``.ckpt`` file; errors name the setting and file."""
    raw = p["imported"]
    if not raw:
        raise ValueError("params train_base.source is 'imported' but train_base.imported is not set "
                         "(give the published-layout base checkpoint, .safetensors or .ckpt)")
    path = REPO_ROOT / Path(str(raw)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"params train_base.imported: checkpoint not found: {path}")
    if path.suffix not in {".safetensors", ".ckpt"}:
        raise ValueError(f"params train_base.imported: {path}: unsupported checkpoint format {path.suffix!r} "
                         f"(use .safetensors or .ckpt)")
    return path


def import_base(path: Path, unet) -> tuple[Any, dict[str, Any]]:
    """The published base at ``path`` converted (``ctrlora.models.convert``: its name map, stale
    LoRA set discarded, unknown / missing / mis-shaped keys refused) into a ControlNet built from
    the backbone's UNet, i.e. with this backbone's config, loaded strictly. Returns the model and
    the conversion facts for ``base_source.json``."""
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.convert import convert_base, read_state_dict

    model = CtrLoRAControlNet.from_unet(unet, condition_embedding="vae")
    try:
        weights, stale = convert_base(read_state_dict(path), model)
        model.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError) as exc:
        msg = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise ValueError(f"params train_base.imported: not a published-layout CtrLoRA base for this backbone: "
                         f"{msg}") from None
    return model, {"discarded_stale_lora_keys": len(stale)}


def base_cache(paths: dict[str, Any], conditions: list[str]):
    """The embed cache as the base sees it: only the scans of the ``base_pairs`` record in its
    training split (checked against the record's content keys; the whole cache when the record
    covers the whole split)."""
    from ctrlora.models.backbone import backbone_hash
    from ctrlora.training.base_pairs import read_record, restrict
    from ctrlora.training.embed import load_embed_cache
    from ctrlora.training.embed_update import read_keys

    record = read_record(paths["base_pairs"])
    if record is None:
        raise FileNotFoundError(f"{paths['base_pairs']}: no base pair record; run `dvc repro base_pairs`")
    if sorted(conditions) != record["conditions"]:
        raise ValueError(f"{paths['base_pairs']} records conditions {record['conditions']}, train_base has "
                         f"{sorted(conditions)}: rerun `dvc repro base_pairs`")
    cache = load_embed_cache(paths["embed"], conditions)
    index = json.loads((paths["embed"] / "index.json").read_text())
    keys = read_keys(paths["embed"], paths["embed_keys"])
    return restrict(cache, index, keys, record, backbone_hash(resolve_backbone(paths["backbone"])))


def train_config(p: dict[str, Any]):
    """The recipe of params ``train_base`` (the section's keys checked: none missing, none unknown)."""
    from ctrlora.training.controlnet import ControlNetTrainConfig

    return ControlNetTrainConfig.from_params(p, "train_base", also=OWN_KEYS)


def main() -> int:
    p, paths = read_params("train_base"), artefact_paths()
    train_config(p)  # every key checked before anything loads
    if base_source(p) == "imported":
        return _main_imported(p, paths)
    return _main_trained(p, paths)


def _main_trained(p: dict[str, Any], paths: dict[str, Any]) -> int:
    from ctrlora.models.adapters import add_adapter, base_hash, save_adapter
    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.controlnet import train_base

    out = paths["base"]
    conditions = list(p["conditions"])
    with timed_stage("train_base"):
        torch.manual_seed(int(p["train"]["seed"]))
        bb = load_backbone(resolve_backbone(paths["backbone"]))
        cache = base_cache(paths, conditions)
        controlnet = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae")
        for c in conditions:
            add_adapter(controlnet, c, rank=int(p["rank"]), own_modules=False)
        ckpt = checkpoint_dir("train_base", p)
        cfg = train_config(p)
        result = train_base(controlnet, bb.unet, bb.scheduler, cache, conditions, cfg, checkpoint_dir=ckpt,
                            shares=p["condition_shares"])
        if not main_process():
            return 0
        if out.exists():
            shutil.rmtree(out)
        controlnet.save_pretrained(out)
        bh = base_hash(controlnet)
        for c in conditions:
            save_adapter(controlnet, c, out / BASE_ADAPTERS / c, base_hash=bh, extra={"stage": "train_base"})
        write_curve(result.history, paths["reports"]["train_base"] / "loss.csv",
                    ["loss", *[f"loss/{c}" for c in conditions]])
        clear_checkpoints(ckpt)
    return 0


def _main_imported(p: dict[str, Any], paths: dict[str, Any]) -> int:
    from ctrlora.models.adapters import add_adapter, base_hash, save_adapter
    from ctrlora.models.backbone import load_backbone
    from ctrlora.training.controlnet import train_condition

    out = paths["base"]
    conditions = list(p["conditions"])
    ckpt_file = imported_checkpoint(p)  # checked before anything loads or trains
    with timed_stage("train_base"):
        torch.manual_seed(int(p["train"]["seed"]))
        bb = load_backbone(resolve_backbone(paths["backbone"]))
        controlnet, facts = import_base(ckpt_file, bb.unet)
        cache = base_cache(paths, conditions)
        controlnet.requires_grad_(False)
        bh = base_hash(controlnet)
        cfg = train_config(p)
        history: list[dict] = []
        offset = 0
        ckpts = []
        for c in conditions:  # one adapter per base condition on the frozen base, as a new condition's
            add_adapter(controlnet, c, rank=int(p["rank"]), own_modules=True)
            ckpt = checkpoint_dir(f"train_base_{c}", p)
            ckpts.append(ckpt)
            result = train_condition(controlnet, bb.unet, bb.scheduler, cache, c, cfg, mode="adapter",
                                     checkpoint_dir=ckpt, max_pairs=p["imported_max_pairs"])
            history += [{**r, "step": int(r["step"]) + offset, f"loss/{c}": r["loss"]}
                        for r in result.history if "loss" in r]
            offset += cfg.train.max_steps
        if base_hash(controlnet) != bh:  # set_trainable froze it; make sure nothing moved it
            raise RuntimeError("train_base (imported): the imported base changed while its adapters trained")
        if not main_process():
            return 0
        if out.exists():
            shutil.rmtree(out)
        controlnet.save_pretrained(out)  # base tensors only: adapters are never in the base folder
        for c in conditions:
            save_adapter(controlnet, c, out / BASE_ADAPTERS / c, base_hash=bh,
                         extra={"stage": "train_base", "base_source": "imported", "steps": cfg.train.max_steps})
        record = {"source": "imported", "checkpoint_sha256": sha256_file(ckpt_file),
                  "checkpoint_format": ckpt_file.suffix.lstrip("."), "base_hash": bh, **facts,
                  "conditions": conditions}
        (out / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        write_curve(history, paths["reports"]["train_base"] / "loss.csv",
                    ["loss", *[f"loss/{c}" for c in conditions]])
        for ckpt in ckpts:
            clear_checkpoints(ckpt)
        print(f"[train_base] imported base {bh[:12]} (checkpoint sha256 {record['checkpoint_sha256'][:12]}); "
              f"adapters for {conditions} -> {out / BASE_ADAPTERS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
