"""Small re-detectors that read a condition back out of a (generated) photograph.

Condition fidelity asks: does the generated image carry the condition it was given? For the
rendered conditions there is no closed-form extractor, so we train one on the training scans
(real photograph → its true map) and apply it to generated images:

* ``task="segmentation"``: photo → label map (``channels`` classes, cross-entropy);
* ``task="regression"``: photo → dense map in [0, 1] with ``channels`` channels (1 for lighting
  or depth, 3 for normals), L1 loss.

Both use :class:`TinyUNet`, a three-level U-Net with two coordinate input channels (tooth type
depends strongly on where in the arch a tooth sits, which plain convolutions cannot see).

Canny needs no training: :func:`detect_canny` runs the same extractor as the condition
(skimage canny on the grayscale image) with the condition's parameters.

Image conventions
-----------------
* ``torch.Tensor`` inputs are ``N×3×H×W`` in **[-1, 1]** (as ``PairDataset`` yields photos).
* ``numpy`` inputs are ``N×H×W×3``, float in **[0, 1]** or ``uint8`` (as images are saved).
* Targets: segmentation ``N×H×W`` integer labels; regression ``N×C×H×W`` or ``N×H×W`` (C = 1)
  float in [0, 1] (tensor or numpy; numpy may also be channel-last ``N×H×W×C``).
* :func:`predict` returns numpy: ``N×H×W`` int64 labels, or float32 ``N×H×W`` (C = 1) /
  ``N×H×W×C`` in [0, 1].
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DetectorConfig",
    "TinyUNet",
    "CannyParams",
    "train_detector",
    "predict",
    "save_detector",
    "load_detector",
    "detect_canny",
    "to_model_input",
]

TASKS = ("segmentation", "regression")
WEIGHTS_NAME = "detector.safetensors"
CONFIG_NAME = "detector_config.json"


@dataclass
class DetectorConfig:
    """What to train and how.

    task: ``"segmentation"`` or ``"regression"``.
    channels: number of classes (segmentation) or output channels (regression: 1 or 3).
    width: channels of the first U-Net level (doubled at each of the two lower levels).
    epochs, lr, batch_size, weight_decay: AdamW with a one-cycle cosine schedule.
    seed: weight initialisation and shuffling (training is reproducible on one thread count).
    augment: add mild random Gaussian noise and a light blur to training inputs, so the
        detector tolerates the softer look of generated images (no flips: they would mirror
        the light direction and the arch).
    class_balance: segmentation only; class c's cross-entropy weight is ``freq_c ** -balance``
        (frequencies from the training labels, weights normalised to a pixel-weighted mean of
        1), so small classes (molars at the edge of the arch) are not ignored. 0 disables.
    condition: free-text name of the condition the detector reads (stored in the config file).
    """

    task: str = "segmentation"
    channels: int = 10
    width: int = 16
    epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True
    class_balance: float = 0.5
    condition: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DetectorConfig.task must be one of {TASKS}, got {self.task!r}")
        if self.channels < 1 or (self.task == "segmentation" and self.channels < 2):
            raise ValueError(f"DetectorConfig.channels too small for {self.task}: {self.channels}")
        if self.width < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"invalid DetectorConfig: {self}")

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DetectorConfig fields: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """Three-level U-Net (full, 1/2, 1/4 resolution + a 1/8 bottleneck) on RGB + (x, y)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        w = config.width
        # full resolution is the expensive level: one conv in, one conv out
        self.enc1 = nn.Sequential(nn.Conv2d(5, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.enc2 = _block(w, 2 * w)
        self.enc3 = _block(2 * w, 4 * w)
        self.mid = _block(4 * w, 4 * w)
        self.dec3 = _block(8 * w, 2 * w)
        self.dec2 = _block(4 * w, w)
        self.dec1 = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(w, config.channels, 1)

    @staticmethod
    def _coords(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        return torch.cat([x, xs, ys], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: N×3×H×W in [-1, 1] (H, W divisible by 8) → N×channels×H×W logits / raw values."""
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"TinyUNet needs H and W divisible by 8, got {h}×{w}")
        e1 = self.enc1(self._coords(x))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.head(d1)


# --------------------------------------------------------------------------- conversions


def to_model_input(images) -> torch.Tensor:
    """Images in either convention (see module doc) → float32 tensor N×3×H×W in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().to(torch.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tensor images must be N×3×H×W in [-1, 1], got shape {tuple(x.shape)}")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.01 or hi > 1.01:
            raise ValueError(f"tensor images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return x.clamp(-1, 1).cpu()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"numpy images must be N×H×W×3 (uint8 or float in [0, 1]), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -0.01 or hi > 1.01:
            raise ValueError(
                f"float numpy images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]"
            )
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return (x * 2.0 - 1.0).clamp(-1, 1)


def _targets_to_tensor(targets, cfg: DetectorConfig, n: int, hw: tuple[int, int]) -> torch.Tensor:
    t = targets if isinstance(targets, torch.Tensor) else torch.from_numpy(np.asarray(targets))
    if cfg.task == "segmentation":
        if t.shape != (n, *hw):
            raise ValueError(f"segmentation targets must be N×H×W = {(n, *hw)}, got {tuple(t.shape)}")
        if t.is_floating_point():
            raise ValueError("segmentation targets must be integer labels")
        t = t.to(torch.int64)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.channels:
            raise ValueError(f"segmentation labels in [{lo}, {hi}] outside [0, {cfg.channels})")
        return t
    t = t.to(torch.float32)
    c = cfg.channels
    if t.ndim == 3 and c == 1:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and not isinstance(targets, torch.Tensor) and t.shape[-1] == c and t.shape[1] != c:
        t = t.permute(0, 3, 1, 2)  # numpy channel-last
    if tuple(t.shape) != (n, c, *hw):
        raise ValueError(f"regression targets must be N×C×H×W = {(n, c, *hw)}, got {tuple(t.shape)}")
    lo, hi = float(t.min()), float(t.max())
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"regression targets must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    return t.contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild, random-per-image degradation: Gaussian noise and a light 3×3 blur."""
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.06
    x = x + sigma * torch.randn(x.shape, generator=gen)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16.0
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    mix = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).to(x.dtype)
    return (mix * blurred + (1 - mix) * x).clamp(-1, 1)


# --------------------------------------------------------------------------- training


def train_detector(cfg: DetectorConfig, images, targets, progress: bool = True) -> TinyUNet:
    """Train a detector from scratch and return it in eval mode.

    ``images``: N×3×H×W tensor in [-1, 1] or N×H×W×3 numpy in [0, 1] / uint8 (see module doc).
    ``targets``: label maps (segmentation) or dense maps in [0, 1] (regression).
    Uses the torch thread count as set by the caller. The global RNG is left untouched.
    """
    from tqdm.auto import tqdm

    x = to_model_input(images)
    n, _, h, w = x.shape
    if n == 0:
        raise ValueError("train_detector: no images")
    y = _targets_to_tensor(targets, cfg, n, (h, w))

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = TinyUNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)

    class_weight = None
    if cfg.task == "segmentation" and cfg.class_balance > 0:
        counts = torch.bincount(y.reshape(-1), minlength=cfg.channels).to(torch.float64)
        freq = counts / counts.sum()
        wts = torch.where(counts > 0, freq.clamp_min(1e-6) ** -cfg.class_balance, torch.zeros_like(freq))
        class_weight = (wts / (wts * freq).sum()).to(torch.float32)

    model.train()
    bar = tqdm(total=total, desc=f"detector[{cfg.condition or cfg.task}]", disable=not progress, leave=False)
    t0 = time.perf_counter()
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.augment:
                xb = _augment(xb, gen)
            out = model(xb)
            if cfg.task == "segmentation":
                loss = F.cross_entropy(out, yb, weight=class_weight)
            else:
                loss = F.l1_loss(torch.sigmoid(out), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.train_seconds = time.perf_counter() - t0  # informational
    model.eval()
    return model


@torch.no_grad()
def predict(model: TinyUNet, images, batch_size: int = 256) -> np.ndarray:
    """Run a detector: labels ``N×H×W`` int64 (segmentation) or maps in [0, 1], float32,
    ``N×H×W`` for one channel and ``N×H×W×C`` otherwise (regression)."""
    x = to_model_input(images)
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size])
        if model.config.task == "segmentation":
            outs.append(out.argmax(1))
        else:
            outs.append(torch.sigmoid(out))
    model.train(was_training)
    res = torch.cat(outs).numpy()
    if model.config.task == "segmentation":
        return res.astype(np.int64)
    res = res.astype(np.float32)
    return res[:, 0] if res.shape[1] == 1 else np.ascontiguousarray(res.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- persistence


def save_detector(model: TinyUNet, directory: str | Path) -> Path:
    """Write ``detector.safetensors`` + ``detector_config.json`` into ``directory``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2, sort_keys=True) + "\n")
    return d


def load_detector(directory: str | Path) -> TinyUNet:
    """Read a detector written by :func:`save_detector` (eval mode)."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} not found (not a detector directory?)")
    cfg = DetectorConfig.from_dict(json.loads((d / CONFIG_NAME).read_text()))
    model = TinyUNet(cfg)
    model.load_state_dict(load_file(str(d / WEIGHTS_NAME)), strict=True)
    model.eval()
    return model


# --------------------------------------------------------------------------- canny


@dataclass(frozen=True)
class CannyParams:
    """How the canny condition is extracted; must match the condition's extractor. The defaults
    are those of ``ctrlora.data.conditions.canny_edges``: BT.601 luma of the [0, 1] photo, then
    skimage ``feature.canny`` with absolute thresholds."""

    sigma: float = 1.0
    low_threshold: float | None = 0.1
    high_threshold: float | None = 0.2
    luma: tuple[float, float, float] = (0.299, 0.587, 0.114)


def _gray01(images, luma: tuple[float, float, float]) -> np.ndarray:
    """Images in either convention → N×H×W float64 luma in [0, 1]."""
    x = to_model_input(images).numpy().astype(np.float64)  # N×3×H×W in [-1, 1]
    rgb = (x + 1.0) / 2.0
    return np.tensordot(np.asarray(luma, dtype=np.float64), rgb, axes=([0], [1]))


def detect_canny(images, params: CannyParams) -> np.ndarray:
    """Canny edges of each image (boolean N×H×W)."""
    from skimage.feature import canny

    gray = _gray01(images, params.luma)
    return np.stack(
        [
            canny(g, sigma=params.sigma, low_threshold=params.low_threshold, high_threshold=params.high_threshold)
            for g in gray
        ]
    )
