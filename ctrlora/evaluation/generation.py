"""Generation phase of the evaluation: batched sampling with one fixed seed per scan.

Scan ``i`` of a split always gets seed ``seed + i``, whatever the batch and whatever the model,
so every model (controlled, uncontrolled, combined) starts from the same initial noise for a
scan and the comparisons between them are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .loading import EvalData

__all__ = ["SamplingConfig", "generate"]


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


def generate(pipe, data: EvalData, conditions: Mapping[str, tuple[str, float, str]], cfg: SamplingConfig,
             desc: str = "generate", progress: bool = True) -> np.ndarray:
    """uint8 ``N×H×W×3`` images for every scan of ``data``. ``conditions``: ``{label: (condition
    of data, weight, adapter or "__base__")}``; ``{}`` = the backbone without control. Scan ``i``
    gets seed ``cfg.seed + i`` whatever the batch."""
    n = len(data)
    out = []
    for start in tqdm(range(0, n, cfg.batch_size), desc=desc, disable=not progress, leave=False):
        sl = slice(start, min(n, start + cfg.batch_size))
        conds = {label: (_tensor01(data.conditions[c][sl]), float(w), adapter)
                 for label, (c, w, adapter) in conditions.items()}
        res = pipe(list(data.captions[sl]), conditions=conds, num_inference_steps=cfg.steps,
                   guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler,
                   seed=[cfg.seed + i for i in range(sl.start, sl.stop)], output_type="np", progress=False)
        out.append(np.clip(np.round(np.asarray(res.images) * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)
