"""DVC stage ``embed`` (params: ``embed``): encode every prepared photograph, condition image and
caption once with the frozen backbone (VAE posterior mean/log-variance + text-encoder states)."""
from __future__ import annotations

import sys
from pathlib import Path

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stage import read_params, resolve_backbone, timed_stage

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from ctrlora.models.backbone import backbone_hash, load_backbone
    from ctrlora.training.embed import build_embed_cache, save_embed_cache

    p = read_params("embed")
    with timed_stage("embed"):
        src = resolve_backbone(ROOT / p["backbone"])
        bb = load_backbone(src)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bb.vae.to(device)
        bb.text_encoder.to(device)
        cache = build_embed_cache(bb.vae, bb.text_encoder, bb.tokenizer, ROOT / p["prepared"], list(p["conditions"]),
                                  batch_size=int(p["batch_size"]))
        cache.info["backbone_hash"] = backbone_hash(src)
        save_embed_cache(cache, ROOT / p["out"])
        print(f"[embed] {len(cache.scan_ids)} photos, conditions {sorted(cache.conditions)} -> {p['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
