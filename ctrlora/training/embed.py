"""The VAE / text-encoder embed cache: encode every photograph, condition image and caption once.

Faithfulness: the reference samples the VAE posterior afresh on every call (mean + std · noise).
The cache therefore stores the posterior's **mean and log-variance**, not a sample, and
the trainers draw a fresh latent at train time with the step's generator
(:func:`ctrlora.models.latents.sample_latent`).

Layout of a cache directory::

    index.json                 scan ids, splits, captions, conditions, scaling factor, sources
    photos.safetensors         mean, logvar            [N, C, h, w]   (unscaled posterior)
    text.safetensors           hidden [N, L, D], empty [1, L, D]     (text-encoder output)
    conditions/<name>.safetensors
                               photo_index [M] (rows of photos), mean, logvar [M, C, h, w]
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ctrlora.data.pairs import SPLITS, PairDataset
from ctrlora.models.latents import encode_posterior, encode_text


@dataclass
class ConditionEmbeds:
    photo_index: torch.Tensor  # long [M]: row in the photo arrays for each pair
    mean: torch.Tensor
    logvar: torch.Tensor


@dataclass
class EmbedCache:
    scan_ids: list[str]
    splits: list[str]
    captions: list[str]
    scaling_factor: float
    photo_mean: torch.Tensor
    photo_logvar: torch.Tensor
    text: torch.Tensor
    empty_text: torch.Tensor
    conditions: dict[str, ConditionEmbeds] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def pair_rows(self, condition: str, split: str = "train") -> torch.Tensor:
        """Indices (into this condition's pair arrays) of the pairs in ``split``."""
        if condition not in self.conditions:
            raise KeyError(f"condition {condition!r} is not in the embed cache; cached: {sorted(self.conditions)}")
        ce = self.conditions[condition]
        mask = torch.tensor([self.splits[int(i)] == split for i in ce.photo_index])
        return torch.nonzero(mask).flatten()


@torch.no_grad()
def build_embed_cache(vae, text_encoder, tokenizer, prepared_root: str | Path, conditions: list[str],
                      batch_size: int = 128, progress: bool = True) -> EmbedCache:
    """Encode every pair of ``conditions`` under ``prepared_root`` with the frozen VAE / text encoder."""
    photo_rows: dict[str, int] = {}
    scan_ids: list[str] = []
    splits: list[str] = []
    captions: list[str] = []
    photo_mean, photo_logvar = [], []
    per_cond: dict[str, ConditionEmbeds] = {}

    for name in conditions:
        pairs = []
        for split in SPLITS:
            ds = PairDataset(prepared_root, name, split)
            pairs += [(ds, i, split) for i in range(len(ds))]
        idx, means, logvars = [], [], []
        bar = tqdm(range(0, len(pairs), batch_size), desc=f"embed {name}", disable=not progress)
        for start in bar:
            items = [(ds[i], split) for ds, i, split in pairs[start:start + batch_size]]
            new = [(it, sp) for it, sp in items if it["scan_id"] not in photo_rows]
            if new:
                mean, logvar = encode_posterior(vae, torch.stack([it["photo"] for it, _ in new]), batch_size=None)
                for it, sp in new:
                    photo_rows[it["scan_id"]] = len(scan_ids)
                    scan_ids.append(it["scan_id"])
                    splits.append(sp)
                    captions.append(it["caption"])
                photo_mean.append(mean)
                photo_logvar.append(logvar)
            mean, logvar = encode_posterior(vae, torch.stack([it["condition"] for it, _ in items]), batch_size=None)
            means.append(mean)
            logvars.append(logvar)
            idx += [photo_rows[it["scan_id"]] for it, _ in items]
        if not idx:
            raise ValueError(f"{prepared_root}: condition {name!r} has no pairs")
        per_cond[name] = ConditionEmbeds(torch.tensor(idx, dtype=torch.long), torch.cat(means), torch.cat(logvars))

    text = encode_text(text_encoder, tokenizer, captions, batch_size)
    empty = encode_text(text_encoder, tokenizer, [""])
    return EmbedCache(scan_ids, splits, captions, float(vae.config.scaling_factor),
                      torch.cat(photo_mean), torch.cat(photo_logvar), text, empty, per_cond)


def save_embed_cache(cache: EmbedCache, out_dir: str | Path) -> None:
    out = Path(out_dir)
    (out / "conditions").mkdir(parents=True, exist_ok=True)
    save_file({"mean": cache.photo_mean.contiguous(), "logvar": cache.photo_logvar.contiguous()}, out / "photos.safetensors")
    save_file({"hidden": cache.text.contiguous(), "empty": cache.empty_text.contiguous()}, out / "text.safetensors")
    for name, ce in cache.conditions.items():
        save_file({"photo_index": ce.photo_index, "mean": ce.mean.contiguous(), "logvar": ce.logvar.contiguous()},
                  out / "conditions" / f"{name}.safetensors")
    (out / "index.json").write_text(json.dumps({
        "scan_ids": cache.scan_ids, "splits": cache.splits, "captions": cache.captions,
        "scaling_factor": cache.scaling_factor, "conditions": sorted(cache.conditions), **cache.info,
    }, indent=1))


def load_embed_cache(cache_dir: str | Path, conditions: list[str] | None = None) -> EmbedCache:
    root = Path(cache_dir)
    index_path = root / "index.json"
    if not index_path.exists():
        raise FileNotFoundError(f"{root}: not an embed cache (no index.json); run the `embed` stage first")
    index = json.loads(index_path.read_text())
    wanted = conditions if conditions is not None else index["conditions"]
    missing = sorted(set(wanted) - set(index["conditions"]))
    if missing:
        raise KeyError(f"{root}: conditions {missing} are not cached; cached: {index['conditions']}")
    photos = load_file(root / "photos.safetensors")
    text = load_file(root / "text.safetensors")
    conds = {}
    for name in wanted:
        t = load_file(root / "conditions" / f"{name}.safetensors")
        conds[name] = ConditionEmbeds(t["photo_index"], t["mean"], t["logvar"])
    info = {k: v for k, v in index.items() if k not in ("scan_ids", "splits", "captions", "scaling_factor", "conditions")}
    return EmbedCache(index["scan_ids"], index["splits"], index["captions"], float(index["scaling_factor"]),
                      photos["mean"], photos["logvar"], text["hidden"], text["empty"], conds, info)
