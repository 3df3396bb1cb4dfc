"""DVC stage ``embed`` (params: ``embed`` and the condition lists of ``train_base`` and
``train_adapter``): encode every prepared photograph, the condition images of every trained
condition and every caption once with the frozen backbone (VAE posterior mean/log-variance +
text-encoder states)."""
from __future__ import annotations

import sys

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stages.common import artefact_paths, read_params, resolve_backbone, timed_stage


def main() -> int:
    from ctrlora.models.backbone import backbone_hash, load_backbone
    from ctrlora.training.embed import build_embed_cache, save_embed_cache

    allp, paths = read_params("embed", "train_base", "train_adapter"), artefact_paths()
    p = allp["embed"]
    conditions = [*allp["train_base"]["conditions"], *allp["train_adapter"]["conditions"]]
    with timed_stage("embed"):
        src = resolve_backbone(paths["backbone"])
        bb = load_backbone(src)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bb.vae.to(device)
        bb.text_encoder.to(device)
        cache = build_embed_cache(bb.vae, bb.text_encoder, bb.tokenizer, paths["prepared"], conditions,
                                  batch_size=int(p["batch_size"]))
        cache.info["backbone_hash"] = backbone_hash(src)
        save_embed_cache(cache, paths["embed"])
        print(f"[embed] {len(cache.scan_ids)} photos, conditions {sorted(cache.conditions)} -> {paths['embed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
