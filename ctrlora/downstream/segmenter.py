"""The user's tooth segmenter: a MONAI U-Net trained from scratch on photographs and label maps.

This is the model a dental team would train on its annotated photographs, and the yardstick of
the downstream-utility experiment: does adding generated photographs (each labelled by the mask
it was generated from) to a few real ones give a better segmenter on real test photographs?

* :class:`SegmenterConfig` — the architecture (``monai.networks.nets.UNet``, 2-D) and the recipe:
  AdamW, cosine decay, ``DiceCELoss`` (Dice + cross-entropy, the field's default for
  segmentation), a fixed number of steps whatever the data size (every arm of a comparison gets
  the same steps and batch).
* :func:`train_segmenter` — real images, optionally generated ones: with generated images every
  batch holds ``real_share`` real images and the rest generated, so a large generated set
  cannot drown the few real photographs (``real_share`` is part of the recipe, the amount of
  generated images is what the experiment tunes on validation).
* Classic augmentation (``augment=True``, MONAI transforms, per image): horizontal flip (the
  label table names teeth by jaw and type, not side, so a left-right flip keeps every label; an
  upper-lower flip would not and is never used), a small random affine (rotation ±10°, scale
  ±10 %, shift ±4 px; labels resampled by nearest neighbour), contrast (gamma), brightness and
  Gaussian noise on the photograph.
* :func:`predict` / :func:`score` — label maps of photographs and their per-image mIoU
  (:func:`ctrlora.evaluation.metrics.miou_per_image`, classes absent from both maps ignored).

Deterministic given ``seed`` and the torch thread count. Weights are saved as safetensors.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["SegmenterConfig", "segmenter_config", "build_segmenter", "train_segmenter", "predict", "score",
           "save_segmenter", "load_segmenter"]

log = logging.getLogger(__name__)


@dataclass
class SegmenterConfig:
    """Architecture (``channels``/``strides``/``num_res_units`` of ``monai.networks.nets.UNet``)
    and training recipe of the segmenter."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    real_share: float = 0.5   # share of real images in a batch when generated images are present
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.strides = tuple(int(s) for s in self.strides)
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"segmenter: {len(self.channels)} channel levels need {len(self.channels) - 1} "
                             f"strides, got {list(self.strides)}")
        if self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"segmenter: steps, batch_size and learning_rate must be positive, got "
                             f"{self.steps}, {self.batch_size}, {self.learning_rate}")
        if not 0.0 < self.real_share <= 1.0:
            raise ValueError(f"segmenter: real_share must be in (0, 1], got {self.real_share}")


def segmenter_config(overrides: Mapping[str, Any] | None = None, **more: Any) -> SegmenterConfig:
    """:class:`SegmenterConfig` from a params mapping; an unknown key is an error (a typo would
    otherwise train with the default silently)."""
    merged = {**dict(overrides or {}), **more}
    known = {f.name for f in fields(SegmenterConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"segmenter: unknown setting(s) {unknown}; known: {sorted(known)}")
    return SegmenterConfig(**merged)


def build_segmenter(num_classes: int, cfg: SegmenterConfig) -> torch.nn.Module:
    """A 2-D MONAI U-Net: 3 input channels (RGB in [-1, 1]), ``num_classes`` logits per pixel."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=int(num_classes), channels=cfg.channels,
                strides=cfg.strides, num_res_units=cfg.num_res_units)


def _augmenter(seed: int):
    """Per-image MONAI augmentation of ``{"image": 3×H×W float, "label": 1×H×W float}``."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandScaleIntensityd)

    t = Compose([
        RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=1),  # axis 1 = width: left <-> right
        RandAffined(keys=("image", "label"), prob=0.8, rotate_range=math.radians(10), scale_range=0.1,
                    translate_range=4, mode=("bilinear", "nearest"), padding_mode="border"),
        RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.4)),
        RandScaleIntensityd(keys="image", prob=0.5, factors=0.15),
        RandGaussianNoised(keys="image", prob=0.3, std=0.03),
    ])
    t.set_random_state(seed=seed)
    return t


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"segmenter: images must be uint8 N×H×W×3, got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _check_pairs(images: np.ndarray, labels: np.ndarray, what: str, num_classes: int) -> None:
    if len(images) == 0:
        raise ValueError(f"segmenter: no {what} images")
    if labels.shape != images.shape[:3]:
        raise ValueError(f"segmenter: {what} label maps {labels.shape} do not match the images {images.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"segmenter: {what} label ids must lie in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")


def train_segmenter(real_images: np.ndarray, real_labels: np.ndarray, num_classes: int, cfg: SegmenterConfig,
                    generated_images: np.ndarray | None = None, generated_labels: np.ndarray | None = None,
                    progress: bool = False, desc: str = "segmenter") -> tuple[torch.nn.Module, list[float]]:
    """Train a segmenter; returns it (eval mode) and its loss per step.

    Batches draw images with replacement from a generator seeded by ``cfg.seed``: all real, or
    ``round(batch_size * real_share)`` real and the rest generated when generated images are given.
    """
    from monai.losses import DiceCELoss

    _check_pairs(real_images, real_labels, "real", num_classes)
    has_gen = generated_images is not None and len(generated_images) > 0
    if has_gen:
        assert generated_images is not None and generated_labels is not None
        _check_pairs(generated_images, generated_labels, "generated", num_classes)
    torch.manual_seed(cfg.seed)
    model = build_segmenter(num_classes, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.learning_rate * 0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rx, ry = _to_input(real_images), torch.from_numpy(np.asarray(real_labels, dtype=np.int64))
    if has_gen:
        gx = _to_input(np.asarray(generated_images))
        gy = torch.from_numpy(np.asarray(generated_labels, dtype=np.int64))
        n_real = max(1, min(cfg.batch_size, round(cfg.batch_size * cfg.real_share)))
    else:
        n_real = cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    aug = _augmenter(cfg.seed) if cfg.augment else None
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(len(rx), (n_real,), generator=gen)
        x, y = rx[idx], ry[idx]
        if has_gen and n_real < cfg.batch_size:
            gidx = torch.randint(len(gx), (cfg.batch_size - n_real,), generator=gen)
            x, y = torch.cat([x, gx[gidx]]), torch.cat([y, gy[gidx]])
        y = y[:, None].float()
        if aug is not None:
            pairs = [aug({"image": x[i], "label": y[i]}) for i in range(len(x))]
            x = torch.stack([torch.as_tensor(p["image"]) for p in pairs]).float()
            y = torch.stack([torch.as_tensor(p["label"]) for p in pairs]).float()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(f"{desc}: the loss became non-finite (learning rate {cfg.learning_rate})")
    return model.eval(), losses


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int64 N×H×W label maps (argmax over classes) of uint8 N×H×W×3 photographs."""
    model.eval()
    x = _to_input(images)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


def score(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image mIoU (float64 [N]) of the model's label maps against ``labels``."""
    from ctrlora.evaluation.metrics import miou_per_image

    return np.asarray(miou_per_image(predict(model, images), np.asarray(labels), num_classes), dtype=np.float64)


def save_segmenter(model: torch.nn.Module, cfg: SegmenterConfig, num_classes: int, out: str | Path) -> None:
    """``out/model.safetensors`` + ``out/config.json`` (architecture, recipe, class count)."""
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "num_classes": int(num_classes)}, indent=1) + "\n")


def load_segmenter(path: str | Path) -> tuple[torch.nn.Module, SegmenterConfig, int]:
    """The segmenter :func:`save_segmenter` wrote (safetensors; nothing unpickled)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    num_classes = int(meta.pop("num_classes"))
    cfg = segmenter_config(meta)
    model = build_segmenter(num_classes, cfg)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), cfg, num_classes
