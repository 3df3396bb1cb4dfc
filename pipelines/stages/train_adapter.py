"""DVC stage ``train_adapter@<condition>`` (params: ``train_adapter``): a new condition's adapter
on the frozen Base ControlNet -> ``<paths.adapters>/<condition>``."""
from __future__ import annotations

import shutil
import sys

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stages.common import (artefact_paths, checkpoint_dir, clear_checkpoints, main_process,
                                     read_params, resolve_backbone, timed_stage, write_curve)


def main(argv: list[str] | None = None) -> int:
    from ctrlora.models.adapters import add_adapter, base_hash, read_adapter_config, save_adapter
    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.baselines import Recipe
    from ctrlora.training.controlnet import ControlNetTrainConfig, train_condition
    from ctrlora.training.embed import load_embed_cache

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m pipelines.stages.train_adapter <condition>")
    condition = argv[0]
    p, paths = read_params("train_adapter"), artefact_paths()
    recipe = Recipe.from_params(p)  # the section's keys checked: none missing, none unknown
    out = paths["adapters"] / condition
    with timed_stage(f"train_adapter@{condition}"):
        torch.manual_seed(recipe.train.seed)
        bb = load_backbone(resolve_backbone(paths["backbone"]))
        cache = load_embed_cache(paths["embed"], [condition])
        controlnet = CtrLoRAControlNet.from_pretrained(paths["base"])
        controlnet.requires_grad_(False)
        bh = base_hash(controlnet)
        add_adapter(controlnet, condition, rank=recipe.rank, own_modules=True)
        ckpt = checkpoint_dir(f"train_adapter_{condition}", p)
        cfg = ControlNetTrainConfig(recipe.train, prompt_dropout=recipe.prompt_dropout)
        result = train_condition(controlnet, bb.unet, bb.scheduler, cache, condition, cfg, mode="adapter",
                                 checkpoint_dir=ckpt, max_pairs=recipe.max_pairs)
        if not main_process():
            return 0
        if out.exists():
            shutil.rmtree(out)
        save_adapter(controlnet, condition, out, base_hash=bh, extra={"stage": "train_adapter",
                                                                      "steps": cfg.train.max_steps})
        write_curve(result.history, paths["reports"]["train_adapter"] / f"{condition}_loss.csv", ["loss"])
        clear_checkpoints(ckpt)
        print(f"[train_adapter] {condition}: {read_adapter_config(out)['num_params']} "
              f"params -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
