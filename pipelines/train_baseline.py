"""DVC stage ``train_baseline@<name>`` (params: ``baselines`` + the ``train_adapter`` recipe): the
baselines the ``evaluate`` stage measures the new-condition adapter against, on the condition
``baselines.condition`` (``lighting`` by default), with the same pairs and step count as
``train_adapter``.

| name | what | trains |
|---|---|---|
| ``random_base`` | the adapter recipe of ``train_adapter`` (same rank, data, steps, lr) on a **randomly initialised** base: ``CtrLoRAControlNet.from_unet(unet, copy_weights=False)`` under ``torch.manual_seed(init_seed)`` (diffusers' default init of every layer, zero convs zero) -- no base training, no UNet copy | the adapter |
| ``full_finetune`` | the trained base (``models/base``) with no adapter, every weight fine-tuned | all ControlNet weights |
| ``cnn`` | the original ControlNet recipe: encoder copied from the UNet + a random hint CNN that reads the condition *image* (added to the noisy latent) | all |
| ``vae_scratch`` | the same, but with CtrLoRA's VAE condition embedding (no hint CNN) | all |

``cnn`` and ``vae_scratch`` save a snapshot at each of ``baselines.save_steps`` (the evaluation
plots fidelity against training steps). The full-weight baselines use ``full_learning_rate``
(the base-training rate; the adapter's 1e-3 is tuned for a few LoRA tensors, not for a whole
network); everything else of the recipe is ``train_adapter``'s.

Outputs under ``<out>/<name>/``: ``baseline.json`` (what was trained, trainable parameter count,
steps) and ``random_base``: ``base/`` + ``adapter/``; ``full_finetune``: ``controlnet/``;
``cnn`` / ``vae_scratch``: ``step_<k>/`` (``save_pretrained`` directories).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stage import checkpoint_dir, clear_checkpoints, read_params, resolve_backbone, timed_stage, write_curve

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("random_base", "full_finetune", "cnn", "vae_scratch")


def condition_images_for_cache(prepared_root: Path, cache, condition: str) -> torch.Tensor:
    """The ``cnn`` ablation's input: condition images in [0, 1], ``[M, 3, H, W]``, one per pair row
    of the embed cache's ``condition`` (row i = the image of scan ``scan_ids[photo_index[i]]``)."""
    import numpy as np
    from PIL import Image

    ce = cache.conditions[condition]
    folder = Path(prepared_root) / "conditions" / condition
    images = []
    for row in ce.photo_index.tolist():
        path = folder / f"{cache.scan_ids[row]}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: condition image of cached pair {cache.scan_ids[row]!r} is missing; "
                                    "the embed cache and data/prepared disagree (rerun `embed`)")
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    arr = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_one(name: str, bb, cache, condition: str, recipe: dict[str, Any], cfg: dict[str, Any], out: Path,
              base_dir: Path | None = None, prepared: Path | None = None,
              ckpt: Path | None = None) -> dict[str, Any]:
    """Train baseline ``name`` and write it to ``out`` (replaced). ``recipe`` = the
    ``train_adapter`` params (``train``, ``rank``, ``prompt_dropout``, ``max_pairs``); ``cfg`` = the
    ``baselines`` params (``init_seed``, ``full_learning_rate``, ``save_steps``). Returns the
    info written to ``baseline.json`` plus the loss history."""
    from ctrlora.models.adapters import add_adapter, base_hash, save_adapter
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.controlnet import ControlNetTrainConfig, train_condition
    from ctrlora.training.loop import TrainConfig

    if name not in NAMES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(NAMES)}")
    train = TrainConfig.from_dict(recipe["train"])
    seed = int(cfg.get("init_seed", 0))
    info: dict[str, Any] = {"name": name, "condition": condition, "steps": train.max_steps,
                            "max_pairs": recipe.get("max_pairs")}
    snapshots: dict[int, Path] = {}
    on_log = None
    cond_images = None
    torch.manual_seed(seed)
    if name == "random_base":
        controlnet = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae", copy_weights=False)
        controlnet.requires_grad_(False)
        bh = base_hash(controlnet)
        add_adapter(controlnet, condition, rank=int(recipe["rank"]), own_modules=True)
        mode = "adapter"
        info.update(init=f"from_unet(copy_weights=False), torch.manual_seed({seed}): diffusers default init",
                    rank=int(recipe["rank"]), learning_rate=train.learning_rate)
    else:
        train = dataclasses.replace(train, learning_rate=float(cfg["full_learning_rate"]))
        mode = "full"
        if name == "full_finetune":
            if base_dir is None:
                raise ValueError("full_finetune needs the trained base directory")
            controlnet = CtrLoRAControlNet.from_pretrained(base_dir)
            info["init"] = f"trained base {base_dir}"
        else:
            kind = "cnn" if name == "cnn" else "vae"
            controlnet = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding=kind, copy_weights=True,
                                                     vae_scale_factor=bb.vae_scale_factor)
            info["init"] = f"from_unet(copy_weights=True, condition_embedding={kind!r}); torch.manual_seed({seed})"
            if name == "cnn":
                if prepared is None:
                    raise ValueError("the cnn baseline needs the prepared data (condition images)")
                cond_images = condition_images_for_cache(prepared, cache, condition)
            steps = sorted({int(s) for s in cfg.get("save_steps", [])} | {train.max_steps})
            bad = [s for s in steps if not 1 <= s <= train.max_steps]
            if bad:
                raise ValueError(f"baselines.save_steps {bad} outside 1..{train.max_steps} (train_adapter's steps)")
            # on_log fires every log_every steps: make every snapshot step one of them
            train = dataclasses.replace(train, log_every=math.gcd(train.log_every, *steps))
            snap_root = Path(ckpt) / "snapshots" if ckpt else Path(tempfile.mkdtemp(prefix=f"{name}_snapshots_"))
            snapshots = {s: snap_root / f"step_{s:05d}" for s in steps}

            def on_log(row, _cn=controlnet):
                target = snapshots.get(int(row["step"]))
                if target is not None:
                    _cn.save_pretrained(target)
        info["learning_rate"] = train.learning_rate
    ccfg = ControlNetTrainConfig(train, prompt_dropout=float(recipe["prompt_dropout"]))
    result = train_condition(controlnet, bb.unet, bb.scheduler, cache, condition, ccfg, mode=mode,
                             checkpoint_dir=ckpt, condition_images=cond_images,
                             max_pairs=recipe.get("max_pairs"), on_log=on_log)
    info["trainable_params"] = int(sum(p.numel() for p in controlnet.parameters() if p.requires_grad))
    info["total_params"] = int(sum(p.numel() for p in controlnet.parameters()))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if name == "random_base":
        # the adapter mode trains exactly the adapter's tensors
        controlnet.save_pretrained(out / "base")
        save_adapter(controlnet, condition, out / "adapter", base_hash=bh,
                     extra={"stage": "train_baseline", "baseline": name, "steps": train.max_steps})
    elif name == "full_finetune":
        controlnet.save_pretrained(out / "controlnet")
    else:
        missing = [s for s, p in snapshots.items() if not (p / "config.json").is_file()]
        if missing:
            raise RuntimeError(f"{name}: snapshots for steps {missing} were not written")
        for s, p in snapshots.items():
            shutil.copytree(p, out / f"step_{s:05d}")
        if not ckpt:
            shutil.rmtree(snap_root, ignore_errors=True)
        info["save_steps"] = sorted(snapshots)
    (out / "baseline.json").write_text(json.dumps(info, indent=1))
    return {**info, "history": result.history}


def main(argv: list[str] | None = None) -> int:
    from ctrlora.models.backbone import load_backbone
    from ctrlora.training.embed import load_embed_cache

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in NAMES:
        raise SystemExit(f"usage: python -m pipelines.train_baseline <{'|'.join(NAMES)}>")
    name = argv[0]
    both = read_params("baselines", "train_adapter")
    p, recipe = both["baselines"], both["train_adapter"]
    condition = p["condition"]
    if condition not in recipe["conditions"]:
        raise SystemExit(f"baselines.condition {condition!r} is not a train_adapter condition {recipe['conditions']}")
    if p.get("threads"):
        torch.set_num_threads(int(p["threads"]))
    out = ROOT / p["out"] / name
    with timed_stage(f"train_baseline@{name}"):
        bb = load_backbone(resolve_backbone(ROOT / p["backbone"]))
        cache = load_embed_cache(ROOT / p["embed"], [condition])
        key = {k: recipe[k] for k in ("train", "rank", "prompt_dropout", "max_pairs")}
        ckpt = checkpoint_dir(f"train_baseline_{name}", {"baselines": p, "recipe": key})
        info = train_one(name, bb, cache, condition, recipe, p, out, base_dir=ROOT / p["base"],
                         prepared=ROOT / p["prepared"], ckpt=ckpt)
        write_curve(info.pop("history"), ROOT / p["reports"] / f"{name}_loss.csv", ["loss"])
        clear_checkpoints(ckpt)
        print(f"[train_baseline] {name} ({condition}): {info['trainable_params']} trainable params, "
              f"{info['steps']} steps -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
