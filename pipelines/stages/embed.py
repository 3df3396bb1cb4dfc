"""DVC stage ``embed`` (params: ``embed`` and the condition lists of ``train_base`` and
``train_adapter``): encode every prepared photograph, the condition images of every trained
condition and every caption with the frozen backbone (VAE posterior mean/log-variance +
text-encoder states).

The cache and its content keys (``paths.embed_keys``) are persistent outputs: a rerun after new
scans land encodes only the rows whose input changed and reuses the rest
(:mod:`ctrlora.training.embed_update`); with no usable previous cache it builds afresh."""
from __future__ import annotations

import json
import sys

import pipelines  # noqa: F401  (tool defaults)
import torch

from pipelines.stages.common import artefact_paths, read_params, resolve_backbone, timed_stage

KEYS = ("batch_size",)  # params embed: exactly these


def main() -> int:
    from ctrlora.data.files import swap_into_place
    from ctrlora.models.backbone import backbone_hash, load_backbone
    from ctrlora.params import checked_section
    from ctrlora.training.embed import save_embed_cache
    from ctrlora.training.embed_update import load_previous, save_keys, update_embed_cache

    allp, paths = read_params("embed", "train_base", "train_adapter"), artefact_paths()
    p = checked_section("embed", allp["embed"], KEYS)
    conditions = [*allp["train_base"]["conditions"], *allp["train_adapter"]["conditions"]]
    out, keys_path = paths["embed"], paths["embed_keys"]
    with timed_stage("embed"):
        src = resolve_backbone(paths["backbone"])
        bh = backbone_hash(src)
        previous, old_keys, status = load_previous(out, keys_path, bh)
        print(f"[embed] previous cache: {status}", flush=True)
        bb = load_backbone(src)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bb.vae.to(device)
        bb.text_encoder.to(device)
        cache, keys, report = update_embed_cache(bb.vae, bb.text_encoder, bb.tokenizer, paths["prepared"], conditions,
                                                 bh, previous, old_keys, batch_size=int(p["batch_size"]))
        del previous
        cache.info["backbone_hash"] = bh
        tmp = out.parent / f".{out.name}.tmp"
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        save_embed_cache(cache, tmp)
        keys_path.unlink(missing_ok=True)  # keys never describe a cache they were not written for
        swap_into_place(tmp, out)
        save_keys(keys, out, keys_path)
        print(f"[embed] {len(cache.scan_ids)} photos, conditions {sorted(cache.conditions)} -> {out} "
              f"(rows {json.dumps(report.as_dict())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
