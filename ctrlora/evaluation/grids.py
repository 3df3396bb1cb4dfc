"""Pictures a person can look at: image grids (condition | generated | ground truth) and curves.

Cells accepted by :func:`save_grid`:
* ``H×W×3`` (or ``H×W×4``, alpha dropped) uint8, or float in [0, 1];
* ``H×W`` or ``H×W×1`` single-channel maps (lighting, depth, edges), shown as gray;
* ``3×H×W`` float tensors/arrays in [-1, 1] are *not* guessed — convert them first
  (:func:`ctrlora.evaluation.detectors.to_model_input` goes the other way);
* label maps must be coloured with :func:`colorize_labels` first (a label map would otherwise
  look black).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["LABEL_COLORS", "colorize_labels", "to_uint8_rgb", "grid_size", "make_grid", "save_grid", "plot_curves"]

PAD = 4
TITLE_H = 14
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)

# 10 well-separated colours for labels 0..9 (background black, gingiva pink, teeth distinct).
LABEL_COLORS = np.array(
    [
        [0, 0, 0],
        [230, 120, 140],
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [23, 190, 207],
        [188, 189, 34],
    ],
    dtype=np.uint8,
)


def colorize_labels(labels: np.ndarray, colors: np.ndarray = LABEL_COLORS) -> np.ndarray:
    """Integer label map ``H×W`` → uint8 RGB ``H×W×3`` (labels beyond the palette wrap around)."""
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"colorize_labels needs integer labels, got dtype {lab.dtype}")
    if lab.min() < 0:
        raise ValueError("colorize_labels: negative labels")
    return colors[lab % len(colors)]


def to_uint8_rgb(img: np.ndarray) -> np.ndarray:
    """One cell (see module doc) → uint8 ``H×W×3``."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise ValueError(f"grid cells must be H×W, H×W×1, H×W×3 or H×W×4, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if lo < -0.01 or hi > 1.01:
            raise ValueError(f"float grid cells must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a


def grid_size(n_rows: int, n_cols: int, cell_hw: tuple[int, int], scale: int, titles: bool, row_label_w: int = 0) -> tuple[int, int]:
    """(width, height) in pixels of the PNG :func:`make_grid` draws."""
    h, w = cell_hw[0] * scale, cell_hw[1] * scale
    width = row_label_w + n_cols * w + (n_cols + 1) * PAD
    height = (TITLE_H if titles else 0) + n_rows * h + (n_rows + 1) * PAD
    return width, height


def make_grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    scale: int | None = None,
    row_label_w: int = 60,
) -> Image.Image:
    """Lay out ``rows`` (each a list of same-sized cells) on a white canvas.

    ``scale`` is the nearest-neighbour upscaling factor; ``None`` picks one that makes each cell
    at least 128 px (×2 for 64-px images). ``titles`` label the columns, ``row_labels`` the rows
    (drawn in a ``row_label_w``-px margin).
    """
    if not rows or not all(len(r) for r in rows):
        raise ValueError("make_grid: need at least one non-empty row")
    n_cols = max(len(r) for r in rows)
    cells = [[to_uint8_rgb(c) for c in r] for r in rows]
    shapes = {c.shape for r in cells for c in r}
    if len(shapes) != 1:
        raise ValueError(f"make_grid: all cells must share one size, got {sorted(shapes)}")
    ch, cw = next(iter(shapes))[:2]
    if titles is not None and len(titles) != n_cols:
        raise ValueError(f"make_grid: {len(titles)} titles for {n_cols} columns")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"make_grid: {len(row_labels)} row labels for {len(rows)} rows")
    if scale is None:
        scale = max(1, -(-128 // max(ch, cw)))
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    label_w = row_label_w if row_labels is not None else 0
    W, H = grid_size(len(rows), n_cols, (ch, cw), scale, titles is not None, label_w)
    canvas = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    top = TITLE_H if titles is not None else 0
    sw, sh = cw * scale, ch * scale
    if titles is not None:
        for j, t in enumerate(titles):
            draw.text((label_w + PAD + j * (sw + PAD), 1), str(t), fill=TEXT, font=font)
    for i, r in enumerate(cells):
        y = top + PAD + i * (sh + PAD)
        if row_labels is not None:
            draw.text((2, y + sh // 2 - 5), str(row_labels[i]), fill=TEXT, font=font)
        for j, c in enumerate(r):
            x = label_w + PAD + j * (sw + PAD)
            canvas.paste(Image.fromarray(c).resize((sw, sh), Image.Resampling.NEAREST), (x, y))
    return canvas


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    scale: int | None = None,
) -> Path:
    """Draw :func:`make_grid` and write it as PNG (parent folders are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, titles=titles, row_labels=row_labels, scale=scale).save(p, format="PNG")
    return p


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
) -> Path:
    """One line per named curve of ``(step, value)`` points, written as PNG (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_curves: no curves")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # A bare Figure on the Agg canvas: no pyplot, no global backend switch, no GUI.
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, pts in curves.items():
        pts = list(pts)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(p, format="png")
    return p
