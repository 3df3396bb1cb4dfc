"""DVC stage ``train_base`` (params: ``train_base``): the Base ControlNet, trained over the base
conditions with one LoRA per condition; writes ``paths.base`` (the base, diffusers format) and
``<paths.base>/adapters/<c>`` (each base condition's adapter: its LoRA + the base's zero convs /
norms, as the reference ships them)."""
from __future__ import annotations

import shutil
import sys

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.settings import BASE_ADAPTERS
from pipelines.stages.common import (artefact_paths, checkpoint_dir, clear_checkpoints, main_process,
                                     read_params, resolve_backbone, timed_stage, write_curve)


def main() -> int:
    from ctrlora.models.adapters import add_adapter, base_hash, save_adapter
    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.controlnet import ControlNetTrainConfig, train_base
    from ctrlora.training.embed import load_embed_cache
    from ctrlora.training.loop import TrainConfig

    p, paths = read_params("train_base"), artefact_paths()
    out = paths["base"]
    conditions = list(p["conditions"])
    with timed_stage("train_base"):
        torch.manual_seed(int(p["train"].get("seed", 0)))
        bb = load_backbone(resolve_backbone(paths["backbone"]))
        cache = load_embed_cache(paths["embed"], conditions)
        controlnet = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae")
        for c in conditions:
            add_adapter(controlnet, c, rank=int(p["rank"]), own_modules=False)
        ckpt = checkpoint_dir("train_base", p)
        cfg = ControlNetTrainConfig(TrainConfig.from_dict(p["train"]), prompt_dropout=float(p["prompt_dropout"]))
        result = train_base(controlnet, bb.unet, bb.scheduler, cache, conditions, cfg, checkpoint_dir=ckpt,
                            shares=p.get("condition_shares"))
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


if __name__ == "__main__":
    sys.exit(main())
