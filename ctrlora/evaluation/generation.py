"""Generation phase of the evaluation: batched sampling with one fixed seed per scan.

Scan ``i`` of a split always gets seed ``seed + i``, whatever the batch and whatever the model,
so every model (controlled, uncontrolled, combined) starts from the same initial noise for a
scan and the comparisons between them are paired.

Images are drawn at the scans' size (:func:`scan_size`), passed to the pipeline as height and width:
the uncontrolled pass has no condition image to take the size from, and the UNet's native size
(512 px for SD 1.5) is not the scans' (64 px in the small graphs). A size the UNet cannot take
(not a multiple of the VAE factor × 2^downsamples) raises the pipeline's ``ValueError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .loading import EvalData

__all__ = ["SamplingConfig", "generate", "scan_size"]


@dataclass
class SamplingConfig:
    """DDIM ``steps``, CFG ``guidance_scale`` (1.0 = no CFG, half the cost), ``batch_size``
    images per pipeline call, and the first scan's ``seed``."""

    steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    batch_size: int = 32
    seed: int = 0


def _tensor01(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def scan_size(data: EvalData) -> tuple[int, int]:
    """(height, width) of the scans of ``data``: of its photos, or of its first condition image
    array when the photos are not one per scan (a generated pool carries none)."""
    n = len(data)
    for a in (data.photos, *data.conditions.values()):
        if a is not None and np.ndim(a) == 4 and a.shape[0] == n:
            return int(a.shape[1]), int(a.shape[2])
    raise ValueError("evaluation data has neither photos nor condition images (N×H×W×3, one per scan) "
                     "to take the size from")


def generate(pipe, data: EvalData, conditions: Mapping[str, tuple[str, float, str]], cfg: SamplingConfig,
             desc: str = "generate", progress: bool = True) -> np.ndarray:
    """uint8 ``N×H×W×3`` images for every scan of ``data``, at the scans' size. ``conditions``:
    ``{label: (condition of data, weight, adapter or "__base__")}``; ``{}`` = the backbone without
    control. Scan ``i`` gets seed ``cfg.seed + i`` whatever the batch."""
    n = len(data)
    height, width = scan_size(data)
    out = []
    for start in tqdm(range(0, n, cfg.batch_size), desc=desc, disable=not progress, leave=False):
        sl = slice(start, min(n, start + cfg.batch_size))
        conds = {label: (_tensor01(data.conditions[c][sl]), float(w), adapter)
                 for label, (c, w, adapter) in conditions.items()}
        res = pipe(list(data.captions[sl]), conditions=conds, num_inference_steps=cfg.steps,
                   guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler,
                   seed=[cfg.seed + i for i in range(sl.start, sl.stop)], height=height, width=width,
                   output_type="np", progress=False)
        out.append(np.clip(np.round(np.asarray(res.images) * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)
