"""Procedural renderer of intraoral frontal views (numpy only, vectorised).

Scene model (all lengths in normalised image units: the image spans x, y in [-1, 1]; ``y`` here
is the *row* direction, pointing down; depth ``Z`` grows toward the camera):

* Each jaw is an arch of up to 14 crowns (central + lateral incisor, canine, two premolars, two
  molars per side) laid out along a parabola ``depth = -k t²`` seen from the front, so back teeth
  are foreshortened, turned sideways (their surface tilts away) and a little smaller (perspective).
* A crown is a height field over its silhouette: a type-specific superellipse (flat-edged
  incisors, pointed canines, rounder premolars, wide molars with two cusps and a buccal groove)
  with a dome profile, a small in-plane rotation and a yaw tilt.
* Gingiva is a smooth surface above (upper) / below (lower) a scalloped margin with papillae
  between the teeth; a missing tooth leaves a dark gap over a lower ridge.
* Everything else is the dark oral background (depth 0, normal (0, 0, 1), lighting 0).

The scene is sampled on a grid ``supersample`` (odd) times finer than the output. Geometry maps
(segmentation, normal, depth, lighting) take the sample at each output pixel's centre, so labels
stay crisp and ``lighting == max(0, n·l)`` holds exactly per pixel; the photograph is the box
average of all samples (anti-aliased), then gets mild blur and camera noise.

Normals are camera space, x right, y up, z toward the camera: for a surface ``Z(x, y_row)``,
``n ∝ (-∂Z/∂x, +∂Z/∂y_row, 1)``. They come from central differences of each object's own height
function, so depth and normals agree by construction.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ctrlora.data.files import swap_into_place
from ctrlora.data.labels import BACKGROUND, GINGIVA_NAME, RENDER_LABELS, label_id, label_table, tooth_label
from ctrlora.data.scan import Scan, write_scan

GENERATOR = "ctrlora-dental-procedural-v1"

SHADES: dict[str, tuple[float, float, float]] = {
    "white": (0.96, 0.95, 0.91),
    "ivory": (0.93, 0.87, 0.76),
    "yellow": (0.90, 0.79, 0.58),
    "grey": (0.80, 0.79, 0.76),
}

# (tooth type, index within type) from the midline backwards, with relative width and height.
_ARCH = {
    "upper": [
        ("incisor", 1, 1.00, 1.00), ("incisor", 2, 0.78, 0.86), ("canine", 1, 0.88, 1.00),
        ("premolar", 1, 0.78, 0.80), ("premolar", 2, 0.74, 0.74), ("molar", 1, 1.15, 0.66),
        ("molar", 2, 1.05, 0.60),
    ],
    "lower": [
        ("incisor", 1, 0.64, 0.80), ("incisor", 2, 0.68, 0.82), ("canine", 1, 0.80, 0.95),
        ("premolar", 1, 0.78, 0.80), ("premolar", 2, 0.80, 0.74), ("molar", 1, 1.20, 0.66),
        ("molar", 2, 1.10, 0.60),
    ],
}


@dataclass(frozen=True)
class RenderConfig:
    resolution: int = 64
    supersample: int = 3  # odd, so each output pixel has a sample at its centre

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise ValueError(f"resolution {self.resolution} < 16")
        if self.supersample < 1 or self.supersample % 2 == 0:
            raise ValueError(f"supersample must be odd and >= 1, got {self.supersample}")


@dataclass
class Tooth:
    name: str  # e.g. upper_right_canine
    jaw: str
    kind: str
    label: int
    present: bool
    xc: float
    yc: float
    hw: float
    hh: float
    roll: float
    z0: float
    slope: float
    bulge: float
    flip: float  # +1: incisal edge downward (upper jaw), -1: upward (lower jaw)
    albedo: np.ndarray
    y_cerv: float  # visible cervical line (gum margin at the tooth centre)


@dataclass
class RenderedScan:
    scan: Scan  # uint8 maps + meta, exactly what is written to disk
    depth: np.ndarray  # float32 H×W, Z at pixel centres (0 on background)
    normal: np.ndarray  # float32 H×W×3 unit normals
    light: np.ndarray  # float64 (3,) unit light direction, camera space
    instance: np.ndarray  # int16 H×W: index into ``teeth`` or -1 background, -2 gingiva
    teeth: list[Tooth] = field(default_factory=list)


# ----------------------------------------------------------------------------------- geometry

def _tooth_height(t: Tooth, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Height field of one crown at scene coordinates: (Z, inside mask, v), v = +1 at the edge."""
    dx = X - t.xc
    dy = Y - t.yc
    c, s = math.cos(t.roll), math.sin(t.roll)
    u = (c * dx + s * dy) / t.hw
    v = (-s * dx + c * dy) / t.hh * t.flip
    au = np.abs(u)
    cerv = np.clip(-v, 0.0, 1.0)
    ve = np.abs(v)
    if t.kind == "incisor":
        w = 1.0 - 0.18 * cerv
        p = 4.0
    elif t.kind == "canine":
        w = (1.0 - 0.15 * cerv) * (1.0 - 0.55 * np.clip((v - 0.1) / 0.9, 0.0, 1.0))
        p = 2.6
    elif t.kind == "premolar":
        w = (1.0 - 0.2 * cerv) * (1.0 - 0.3 * np.clip((v - 0.3) / 0.7, 0.0, 1.0))
        p = 2.6
    else:  # molar: two buccal cusps, a notch between them on the occlusal edge
        w = 1.0 - 0.1 * cerv
        ve = np.where(v > 0, v / (1.0 - 0.12 * np.exp(-((u / 0.28) ** 2))), -v)
        p = 3.2
    ue = au / w
    r = (ue**p + ve**p) ** (1.0 / p)
    inside = r < 1.0
    dome = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    z = dome * (1.0 - 0.2 * u * u)
    if t.kind == "canine":
        z = z + 0.25 * dome * np.clip(1.0 - 2.0 * au, 0.0, 1.0)
    elif t.kind == "molar":
        z = z - 0.25 * dome * np.exp(-((u / 0.14) ** 2)) * np.clip(v + 0.4, 0.0, 1.4)
    return t.z0 + t.slope * dx + t.bulge * z, inside, v


@dataclass
class _Gum:
    jaw: str
    xs: np.ndarray  # fine x grid for the margin line
    margin: np.ndarray  # margin row per x: upper gum is y < margin, lower gum is y > margin
    y_ref: float  # mean cervical line
    z_front: float
    k: float
    unit: float
    ripple_phase: float

    def height(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(Z, inside, distance past the margin, dZ/dX, dZ/dY) at scene coordinates."""
        m = np.interp(X, self.xs, self.margin)
        sgn = 1.0 if self.jaw == "upper" else -1.0  # upper: d grows upward (toward smaller y)
        d = sgn * (self.y_ref - Y)
        dm = sgn * (m - Y)
        inside = dm > 0
        dd = np.clip(d, 0.0, None)
        w = 2 * math.pi / (1.8 * self.unit)
        g = np.exp(-((d / 0.08) ** 2))
        z = (self.z_front - 0.05 - self.k * X * X - 0.35 * dd * dd
             + 0.012 * np.cos(w * X + self.ripple_phase) + 0.02 * g)
        dz_dx = -2.0 * self.k * X - 0.012 * w * np.sin(w * X + self.ripple_phase)
        dz_dd = -0.7 * dd + 0.02 * g * (-2.0 * d / 0.08**2)
        dz_dy = dz_dd * (-sgn)
        return z, inside, dm, dz_dx, dz_dy


# ------------------------------------------------------------------------------------ scene

def _arch_t_of_s(k: float) -> tuple[np.ndarray, np.ndarray]:
    """Arc length table of the parabola depth = -k t² (top view); returns (s, t)."""
    t = np.linspace(0.0, 2.5, 2001)
    ds = np.sqrt(1.0 + (2.0 * k * t) ** 2)
    s = np.concatenate([[0.0], np.cumsum(0.5 * (ds[1:] + ds[:-1]) * np.diff(t))])
    return s, t


def _layout(rng: np.random.Generator) -> dict[str, Any]:
    jaw = str(rng.choice(["both", "upper", "lower"], p=[0.7, 0.15, 0.15]))
    scale = rng.uniform(0.92, 1.08)
    params = {
        "jaw": jaw,
        "scale": scale,
        "unit": 0.33 * scale,  # upper central incisor width
        "height": 0.62 * scale,  # upper central incisor visible crown height
        "k": rng.uniform(0.5, 0.72),
        "persp": 0.3,
        "x_off": rng.uniform(-0.06, 0.06),
        "roll": math.radians(rng.uniform(-4.0, 4.0)),
        "z_front": rng.uniform(0.70, 0.78),
        "gap": rng.uniform(-0.10, 0.14) if jaw == "both" else 0.0,
        "y_occ": {"both": rng.uniform(-0.05, 0.08), "upper": rng.uniform(0.28, 0.42),
                  "lower": rng.uniform(-0.42, -0.28)}[jaw],
        "p_missing": 0.0 if rng.random() < 0.5 else rng.uniform(0.04, 0.15),
        "diastema": rng.uniform(0.03, 0.07) if rng.random() < 0.12 else 0.0,
        "shade": str(rng.choice(sorted(SHADES))),
    }
    return params


def _build_teeth(rng: np.random.Generator, P: dict[str, Any]) -> list[Tooth]:
    jaws = ["upper", "lower"] if P["jaw"] == "both" else [P["jaw"]]
    s_tab, t_tab = _arch_t_of_s(P["k"])
    shade = np.array(SHADES[P["shade"]])
    teeth: list[Tooth] = []
    for jaw in jaws:
        for side, side_name in ((1.0, "right"), (-1.0, "left")):
            # Image right = patient's left; names follow the image side for simplicity.
            s = P["diastema"] / 2 + rng.uniform(0.0, 0.006)
            for kind, idx, rel_w, rel_h in _ARCH[jaw]:
                width = rel_w * P["unit"] * rng.uniform(0.95, 1.05)
                height = rel_h * P["height"] * rng.uniform(0.94, 1.06)
                s0, s1 = s, s + width
                s = s1 + rng.uniform(0.0, 0.012)
                t0, t1, tc = np.interp([s0, s1, (s0 + s1) / 2], s_tab, t_tab)
                back = P["k"] * tc * tc
                pf = 1.0 / (1.0 + P["persp"] * back)
                hw = 0.5 * (t1 - t0) * pf * 0.97
                hgt = height * pf
                if jaw == "upper":
                    y_inc = P["y_occ"] - P["gap"] / 2 - 0.10 * tc * tc
                    y_inc = P["y_occ"] + (y_inc - P["y_occ"]) * pf
                    y_cerv = y_inc - hgt
                    yc = y_inc - 0.575 * hgt
                    z0 = P["z_front"] - back
                    flip = 1.0
                else:
                    y_inc = P["y_occ"] + P["gap"] / 2 + 0.03 * tc * tc
                    y_inc = P["y_occ"] + (y_inc - P["y_occ"]) * pf
                    y_cerv = y_inc + hgt
                    yc = y_inc + 0.575 * hgt
                    z0 = P["z_front"] - 0.06 - back
                    flip = -1.0
                tint = np.array([1.0, 0.97, 0.92]) if kind == "canine" else np.ones(3)
                albedo = shade * tint * rng.uniform(0.96, 1.03) * rng.uniform(0.985, 1.015, size=3)
                present = bool(rng.random() >= P["p_missing"])
                suffix = "" if kind == "canine" else str(idx)
                teeth.append(Tooth(
                    name=f"{jaw}_{side_name}_{kind}{suffix}", jaw=jaw, kind=kind,
                    label=tooth_label(jaw, kind), present=present,
                    xc=side * tc * pf + P["x_off"], yc=yc, hw=hw, hh=0.575 * hgt,
                    roll=math.radians(rng.uniform(-6.0, 6.0)), z0=z0,
                    slope=-side * 2.0 * P["k"] * tc + rng.uniform(-0.1, 0.1),
                    bulge=0.4 * 0.5 * width * pf, flip=flip, albedo=albedo, y_cerv=y_cerv,
                ))
    if not any(t.present for t in teeth):
        teeth[0].present = True
    return teeth


def _build_gums(rng: np.random.Generator, P: dict[str, Any], teeth: list[Tooth]) -> list[_Gum]:
    gums = []
    xs = np.linspace(-2.0, 2.0, 2049)
    for jaw in ("upper", "lower"):
        jt = sorted((t for t in teeth if t.jaw == jaw), key=lambda t: t.xc)
        if not jt:
            continue
        pap = 0.22 * P["height"]
        cx = np.array([t.xc for t in jt])
        base = np.interp(xs, cx, np.array([t.y_cerv for t in jt]))
        if jaw == "upper":
            margin = base + pap
            for t in jt:
                if t.present:
                    u = (xs - t.xc) / t.hw
                    sel = np.abs(u) < 1.0
                    margin[sel] = np.minimum(margin[sel], t.y_cerv + pap * u[sel] ** 2)
        else:
            margin = base - pap
            for t in jt:
                if t.present:
                    u = (xs - t.xc) / t.hw
                    sel = np.abs(u) < 1.0
                    margin[sel] = np.maximum(margin[sel], t.y_cerv - pap * u[sel] ** 2)
        z_front = max(t.z0 for t in jt)
        gums.append(_Gum(jaw=jaw, xs=xs, margin=margin, y_ref=float(np.mean([t.y_cerv for t in jt[len(jt) // 2 - 1: len(jt) // 2 + 1]])),
                         z_front=z_front, k=P["k"] * 0.8, unit=P["unit"],
                         ripple_phase=rng.uniform(0, 2 * math.pi)))
    return gums


def _light(rng: np.random.Generator) -> np.ndarray:
    az = rng.uniform(0.0, 2.0 * math.pi)
    polar = math.radians(rng.uniform(8.0, 60.0))
    return np.array([math.sin(polar) * math.cos(az), math.sin(polar) * math.sin(az), math.cos(polar)])


def _normalise(g_x: np.ndarray, g_y: np.ndarray) -> np.ndarray:
    n = np.stack([-g_x, g_y, np.ones_like(g_x)], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


@dataclass
class _Grid:
    """The supersampled sample grid in image coordinates and the scan's roll into scene ones."""

    n: int  # samples per side
    xi: np.ndarray  # N×N image x of every sample
    yi: np.ndarray  # N×N image y (rows)
    cr: float  # cos / sin of the roll
    sr: float

    @classmethod
    def make(cls, n: int, roll: float) -> "_Grid":
        coords = -1.0 + (np.arange(n) + 0.5) * (2.0 / n)
        yi, xi = np.meshgrid(coords, coords, indexing="ij")
        return cls(n, xi, yi, math.cos(roll), math.sin(roll))

    @property
    def step(self) -> float:
        """Finite-difference step: a quarter of a fine sample."""
        return 0.5 / self.n

    def scene(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.cr * x - self.sr * y, self.sr * x + self.cr * y


@dataclass
class _Raster:
    """Per-sample scene buffers, filled nearest-surface-wins by the teeth and then the gums."""

    z: np.ndarray  # height toward the camera (-inf: nothing yet)
    gx: np.ndarray  # image-space gradient of z
    gy: np.ndarray
    inst: np.ndarray  # index into the teeth, -2 gingiva, -1 background
    vloc: np.ndarray  # tooth-local vertical coordinate (incisal edge > 0, cervical < 0)
    lab: np.ndarray  # segmentation label
    gum_depth: np.ndarray  # distance past the gum margin

    @classmethod
    def empty(cls, n: int) -> "_Raster":
        return cls(np.full((n, n), -np.inf), np.zeros((n, n)), np.zeros((n, n)), np.full((n, n), -1, dtype=np.int16),
                   np.zeros((n, n)), np.zeros((n, n), dtype=np.uint8), np.zeros((n, n)))


def _raster_teeth(teeth: list[Tooth], grid: _Grid, ras: _Raster) -> None:
    """Draw every present crown inside its bounding box, with central-difference gradients."""
    n, h, cr, sr = grid.n, grid.step, grid.cr, grid.sr
    for i, t in enumerate(teeth):
        if not t.present:
            continue
        # conservative bounding box in image coords
        rad = math.hypot(t.hw, t.hh) * 1.05
        cx_img = cr * t.xc + sr * t.yc
        cy_img = -sr * t.xc + cr * t.yc
        c0 = max(0, int((cx_img - rad + 1) / 2 * n))
        c1 = min(n, int(math.ceil((cx_img + rad + 1) / 2 * n)))
        r0 = max(0, int((cy_img - rad + 1) / 2 * n))
        r1 = min(n, int(math.ceil((cy_img + rad + 1) / 2 * n)))
        if c0 >= c1 or r0 >= r1:
            continue
        X, Y = grid.xi[r0:r1, c0:c1], grid.yi[r0:r1, c0:c1]
        z, inside, v = _tooth_height(t, *grid.scene(X, Y))
        zxp = _tooth_height(t, *grid.scene(X + h, Y))[0]
        zxm = _tooth_height(t, *grid.scene(X - h, Y))[0]
        zyp = _tooth_height(t, *grid.scene(X, Y + h))[0]
        zym = _tooth_height(t, *grid.scene(X, Y - h))[0]
        box = (slice(r0, r1), slice(c0, c1))
        win = inside & (z > ras.z[box])
        ras.z[box][win] = z[win]
        ras.gx[box][win] = ((zxp - zxm) / (2 * h))[win]
        ras.gy[box][win] = ((zyp - zym) / (2 * h))[win]
        ras.inst[box][win] = i
        ras.vloc[box][win] = v[win]
        ras.lab[box][win] = t.label


def _raster_gums(gums: list[_Gum], grid: _Grid, ras: _Raster) -> None:
    """Draw the gums over the rows they can reach; a gum hides the other jaw's teeth only where
    it is nearer the camera."""
    n, cr, sr = grid.n, grid.cr, grid.sr
    lower_tooth = np.isin(ras.lab, [tooth_label("lower", k) for k in ("incisor", "canine", "premolar", "molar")])
    upper_tooth = np.isin(ras.lab, [tooth_label("upper", k) for k in ("incisor", "canine", "premolar", "molar")])
    for g in gums:
        # only the rows the gum can reach (margin extent, widened for the scan's roll)
        reach = np.abs(sr) * 1.5 + 2.0 / n
        if g.jaw == "upper":
            r0, r1 = 0, min(n, int(math.ceil((g.margin.max() + reach + 1) / 2 * n)))
        else:
            r0, r1 = max(0, int((g.margin.min() - reach + 1) / 2 * n)), n
        if r0 >= r1:
            continue
        Xs, Ys = grid.scene(grid.xi[r0:r1], grid.yi[r0:r1])
        z, inside, dm, dzx, dzy = g.height(Xs, Ys)
        # scene gradient -> image gradient: scene = R · image, so grad_image = Rᵀ · grad_scene
        gx = cr * dzx + sr * dzy
        gy = -sr * dzx + cr * dzy
        other = (lower_tooth if g.jaw == "upper" else upper_tooth)[r0:r1]
        win = inside & (~other | (z > ras.z[r0:r1]))
        ras.z[r0:r1][win] = z[win]
        ras.gx[r0:r1][win] = gx[win]
        ras.gy[r0:r1][win] = gy[win]
        ras.inst[r0:r1][win] = -2
        ras.lab[r0:r1][win] = label_id(GINGIVA_NAME)
        ras.gum_depth[r0:r1][win] = dm[win]


def _shading(ras: _Raster, light: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(foreground mask, unit normals, max(0, n·l)); the background gets normal (0, 0, 1), depth
    0 (set in ``ras.z``) and lighting 0."""
    fg = ras.lab != BACKGROUND
    normal = _normalise(ras.gx, ras.gy)
    normal[~fg] = (0.0, 0.0, 1.0)
    ras.z[~fg] = 0.0
    ndotl = np.clip(normal @ light, 0.0, None)
    ndotl[~fg] = 0.0
    return fg, normal, ndotl


def _albedo(rng: np.random.Generator, ras: _Raster, teeth: list[Tooth]) -> np.ndarray:
    """Surface colour per sample: tooth shades with incisal translucency and cervical warmth,
    gingiva blending into mucosa away from the margin."""
    n = ras.lab.shape[0]
    gum = ras.lab == label_id(GINGIVA_NAME)
    tooth = (ras.lab != BACKGROUND) & ~gum
    albedo = np.zeros((n, n, 3))
    alb_table = np.array([t.albedo for t in teeth])
    albedo[tooth] = alb_table[ras.inst[tooth]]
    edge = np.clip((ras.vloc - 0.55) / 0.45, 0.0, 1.0)[..., None] * 0.35
    albedo = np.where(tooth[..., None], albedo * (1 - edge) + edge * np.array([0.62, 0.68, 0.76]), albedo)
    cerv = np.clip((-ras.vloc - 0.3) / 0.7, 0.0, 1.0)[..., None] * 0.25
    albedo = np.where(tooth[..., None], albedo * (1 - cerv) + cerv * np.array([0.86, 0.70, 0.48]), albedo)
    gum_base = np.array([0.80, 0.40, 0.42]) * rng.uniform(0.9, 1.06)
    mucosa = np.array([0.60, 0.17, 0.22]) * rng.uniform(0.9, 1.1)
    mix = np.clip(ras.gum_depth / 0.35, 0.0, 1.0)[..., None]
    return np.where(gum[..., None], gum_base * (1 - mix) + mucosa * mix, albedo)


def _photo_radiance(rng: np.random.Generator, ras: _Raster, teeth: list[Tooth], grid: _Grid, light: np.ndarray,
                    fg: np.ndarray, normal: np.ndarray, ndotl: np.ndarray) -> np.ndarray:
    """Blinn-Phong radiance per sample (ambient with crevice darkening, diffuse, specular) over
    a vignetted dark background, times a random exposure."""
    amb = rng.uniform(0.22, 0.38)
    intensity = rng.uniform(0.8, 1.05)
    light_rgb = np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.88, 0.98)])
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    ndoth = np.clip(normal @ half, 0.0, None)
    albedo = _albedo(rng, ras, teeth)
    gum = ras.lab == label_id(GINGIVA_NAME)
    tooth = (ras.lab != BACKGROUND) & ~gum
    # crevice darkening: surface points that face sideways catch less ambient light
    ao = np.where(fg, 0.55 + 0.45 * normal[..., 2], 1.0)
    ks = np.where(tooth, rng.uniform(0.35, 0.6), np.where(gum, 0.12, 0.0))
    shin = np.where(tooth, 30.0, 12.0)
    spec = ks * ndoth**shin
    photo = albedo * (amb * ao + intensity * ndotl)[..., None] * light_rgb + (spec * intensity)[..., None] * light_rgb
    bg = np.array([0.10, 0.025, 0.03]) * rng.uniform(0.5, 1.3)
    vign = 1.0 - 0.4 * (grid.xi**2 + grid.yi**2) / 2
    photo[~fg] = bg * vign[~fg][:, None]
    photo *= rng.uniform(0.92, 1.08)
    return photo


def _camera(rng: np.random.Generator, radiance: np.ndarray, resolution: int, ss: int) -> np.ndarray:
    """Box-filter the samples down to the output pixels, then mild blur and camera noise -> uint8."""
    photo = radiance.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))
    blur = rng.uniform(0.0, 0.6)
    if blur > 0:
        k3 = np.array([0.25, 0.5, 0.25])
        pad = np.pad(photo, ((1, 1), (1, 1), (0, 0)), mode="edge")
        b = k3[0] * pad[:-2] + k3[1] * pad[1:-1] + k3[2] * pad[2:]
        b = k3[0] * b[:, :-2] + k3[1] * b[:, 1:-1] + k3[2] * b[:, 2:]
        photo = (1 - blur) * photo + blur * b
    photo = photo + rng.normal(0.0, rng.uniform(0.004, 0.015), size=photo.shape)
    return np.clip(np.round(photo * 255.0), 0, 255).astype(np.uint8)


@dataclass
class _Maps:
    """The geometry maps at output pixel centres."""

    lab: np.ndarray  # uint8 labels
    inst: np.ndarray  # int16 instances
    normal: np.ndarray  # float32 H×W×3
    depth: np.ndarray  # float32 Z (raw, background 0 via the raster)
    lighting: np.ndarray  # float n·l

    @classmethod
    def at_centres(cls, ras: _Raster, normal: np.ndarray, ndotl: np.ndarray, ss: int) -> "_Maps":
        c = ss // 2
        return cls(ras.lab[c::ss, c::ss].copy(), ras.inst[c::ss, c::ss].copy(),
                   normal[c::ss, c::ss].astype(np.float32), ras.z[c::ss, c::ss].astype(np.float32),
                   ndotl[c::ss, c::ss])


def _scan_meta(seed: int, resolution: int, P: dict[str, Any], light: np.ndarray, teeth: list[Tooth],
               inst: np.ndarray, grid: _Grid, sid: str) -> dict[str, Any]:
    visible = set(np.unique(inst[inst >= 0]).tolist())
    in_frame = [t for t in teeth if abs(grid.cr * t.xc + grid.sr * t.yc) < 0.95]
    return {
        "generator": GENERATOR,
        "seed": int(seed),
        "resolution": resolution,
        "jaw": P["jaw"],
        "shade": P["shade"],
        "light_direction": [round(float(x), 6) for x in light],
        "teeth_present": sorted(t.name for i, t in enumerate(teeth) if i in visible),
        "teeth_missing": sorted(t.name for t in in_frame if not t.present),
        "gap": round(float(P["gap"]), 4),
        "scan_id": sid,
    }


def render_scan(seed: int, config: RenderConfig = RenderConfig(), scan_id: str | None = None) -> RenderedScan:
    """Render one scan from its seed. Same seed and config -> identical arrays.

    Phases: layout (arch, teeth, gums, light: every random draw of the geometry), raster (the
    supersampled height field, gradients, labels), shading (normals, n·l), photograph
    (radiance, camera), then the geometry maps at the pixel centres. The label table must hold the
    labels it draws (:data:`~ctrlora.data.labels.RENDER_LABELS`); a table that numbers teeth cannot
    render (ValueError naming what it lacks)."""
    label_table().require(RENDER_LABELS, "the renderer (it draws tooth types by jaw)")
    rng = np.random.default_rng(seed)
    R, ss = config.resolution, config.supersample
    P = _layout(rng)
    teeth = _build_teeth(rng, P)
    gums = _build_gums(rng, P, teeth)
    light = _light(rng)

    grid = _Grid.make(R * ss, P["roll"])
    ras = _Raster.empty(grid.n)
    _raster_teeth(teeth, grid, ras)
    _raster_gums(gums, grid, ras)
    fg, normal, ndotl = _shading(ras, light)
    photo8 = _camera(rng, _photo_radiance(rng, ras, teeth, grid, light, fg, normal, ndotl), R, ss)

    maps = _Maps.at_centres(ras, normal, ndotl, ss)
    fg_c = maps.lab != BACKGROUND
    depth8 = np.where(fg_c, np.clip(np.round(maps.depth * 255.0), 1, 255), 0).astype(np.uint8)
    normal8 = np.clip(np.round((maps.normal + 1.0) * 0.5 * 255.0), 0, 255).astype(np.uint8)
    light8 = np.clip(np.round(maps.lighting * 255.0), 0, 255).astype(np.uint8)

    sid = scan_id if scan_id is not None else f"seed{seed}"
    meta = _scan_meta(seed, R, P, light, teeth, maps.inst, grid, sid)
    scan = Scan(scan_id=sid, photo=photo8, segmentation=maps.lab, lighting=light8, normal=normal8,
                depth=depth8, meta=meta)
    return RenderedScan(scan=scan, depth=np.where(fg_c, maps.depth, 0.0).astype(np.float32), normal=maps.normal,
                        light=light, instance=maps.inst, teeth=teeth)


# ---------------------------------------------------------------------------------- dataset

@dataclass(frozen=True)
class DatasetConfig:
    out: Path
    n: int
    seed: int = 0
    resolution: int = 64
    workers: int = 2
    progress: bool = True

    @classmethod
    def from_params(cls, section: Mapping[str, Any], out: str | Path) -> "DatasetConfig":
        """From params.yaml ``render`` (every key stated there; unknown or missing keys refused)."""
        from ctrlora.params import checked_section

        p = checked_section("render", section, ("n", "seed", "resolution", "workers"))
        return cls(out=Path(out), n=int(p["n"]), seed=int(p["seed"]), resolution=int(p["resolution"]),
                   workers=int(p["workers"]))


def scan_id_for(seed: int, index: int) -> str:
    return f"r{seed}-{index:05d}"


def scan_seed(seed: int, index: int) -> int:
    """Per-scan seed: independent of the worker that renders it and of the scan count."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _render_one(job: tuple[int, int, int, str]) -> str:
    seed, index, resolution, out = job
    sid = scan_id_for(seed, index)
    rs = render_scan(scan_seed(seed, index), RenderConfig(resolution=resolution), scan_id=sid)
    rs.scan.meta["index"] = index
    rs.scan.meta["dataset_seed"] = seed
    write_scan(rs.scan, Path(out))
    return sid


def render_dataset(cfg: DatasetConfig) -> dict[str, Any]:
    """Render ``cfg.n`` scans into ``cfg.out`` (built in a temporary sibling, renamed into place
    when complete; an existing ``cfg.out`` is replaced only then)."""
    from tqdm import tqdm

    label_table().require(RENDER_LABELS, "the renderer (it draws tooth types by jaw)")  # before any work
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    jobs = [(cfg.seed, i, cfg.resolution, str(tmp)) for i in range(cfg.n)]
    start = time.perf_counter()
    try:
        bar = tqdm(total=cfg.n, desc="render", unit="scan", disable=not cfg.progress)
        if cfg.workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(cfg.workers) as pool:
                for _ in pool.imap_unordered(_render_one, jobs, chunksize=16):
                    bar.update()
        else:
            for job in jobs:
                _render_one(job)
                bar.update()
        bar.close()
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"scans": cfg.n, "seconds": round(seconds, 2), "bytes": size, "out": str(out)}
