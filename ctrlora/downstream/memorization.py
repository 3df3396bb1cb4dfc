"""Memorization audit: are generated images closer to training photographs than new photographs
are?

Latent diffusion models can reproduce their training images, and medical training images are
exactly what must not leave the clinic. Before a generated set is shared, this module measures,
for every generated image, the distance to its **nearest training photograph**, and compares it
with the same distance measured for the **test photographs** (real scans the model never saw).

Why test-to-train is the reference
    Two genuine photographs of mouths are never far apart in every respect: same layout, same
    colours, sometimes the same patient. The nearest-training distance of a held-out photograph
    says how close a *new* photograph gets to the training set by chance. A generated image that
    lies much closer than that is suspicious; one that lies about as far is what a fresh
    photograph would look like.

What the share means
    The threshold is the ``percentile``-th percentile (default 1 %) of the test-to-train
    distances. The audit reports the share of generated images closer to some training
    photograph than that threshold, with an interval. For the test images themselves that share
    is about ``percentile / 100`` by construction (reported as a sanity line). A generated share
    near that figure says the generated images are no closer to the training photographs than new
    photographs are; a share well above it (up to 1 for a set of copies) says the model
    reproduces training images, and :func:`closest_pairs_grid` shows which ones.

Its limits, plainly
    A share near the test's own is **not a proof of privacy**. The features are raw pixels or VAE
    latents, not an identity model: an image can be far from every training photograph in these
    spaces and still show a recognisable patient (a crop, a mirror image, a different light), and
    the audit only looks at the training photographs it is given. It finds copies and
    near-copies; it does not certify their absence.

Two feature spaces
    * :func:`pixel_features` -- RMS pixel difference. Catches near-copies: the same image up to
      noise or compression.
    * :func:`latent_features` -- the backbone VAE encoder's posterior mean, the space the
      diffusion model learns in. It summarises each 8×8 (tiny preset: 4×4) patch, so it weighs
      layout and shapes over pixel-level noise and texture: a copy whose colour or light has
      drifted a little (re-shaded, re-toned, re-noised), which can move it past the pixel
      threshold, tends to stay close in latent space. Run the audit in both spaces.

Both give rows scaled so that the L2 distance between two rows is the RMS difference of the
underlying values; :func:`nearest` computes those distances in chunks, :func:`audit` turns them
into the report (plain JSON-ready numbers) plus the per-image arrays the grid needs.

Intervals
    ``generated_share`` carries a two-sample percentile bootstrap: every resample draws
    generated images *and* test images with replacement and re-estimates the threshold, so the
    interval includes the uncertainty of a threshold read from the few closest test images.
    ``generated_share_wilson`` is the Wilson score interval for the count below the fixed
    threshold (generated images only); it stays informative when no or all generated images
    fall below it, where a bootstrap collapses to a single point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from ctrlora.evaluation.detectors import to_model_input
from ctrlora.evaluation.grids import save_grid
from ctrlora.evaluation.stats import Interval, resample_indices
from ctrlora.models.latents import encode_posterior

__all__ = ["AuditResult", "pixel_features", "latent_features", "nearest", "wilson_interval", "audit",
           "closest_pairs", "closest_pairs_grid", "QUANTILES"]

# The quantiles (percent) of each distance distribution the report lists.
QUANTILES = (1.0, 5.0, 50.0)
# Bootstrap resamples processed at once (bounds the [block, n] arrays of resampled distances).
_BOOT_BLOCK = 256


# ------------------------------------------------------------------------------- features

def _check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 N×H×W×3 photographs, got dtype {a.dtype}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 N×H×W×3 photographs, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty (no images)")
    return a


def _rms_rows(x: np.ndarray) -> np.ndarray:
    """Flatten to N×D float32 and divide by sqrt(D): the L2 distance of two rows is then the RMS
    difference of their values."""
    flat = x.reshape(x.shape[0], -1).astype(np.float32)
    return flat / np.float32(math.sqrt(flat.shape[1]))


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 ``N×H×W×3`` photographs -> float32 ``N×(H·W·3)``: values in [0, 1], scaled so that
    the L2 distance between two rows is their RMS pixel difference (in [0, 1] units)."""
    a = _check_images(images)
    return _rms_rows(a.astype(np.float32) / np.float32(255.0))


def latent_features(vae: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 ``N×H×W×3`` photographs -> float32 ``N×(C·h·w)``: the VAE posterior **mean** (no
    sample, no ``scaling_factor``) of each photograph fed in [-1, 1], flattened and scaled like
    :func:`pixel_features` (row distance = RMS latent difference).

    Encodes as the rest of the project does (:func:`ctrlora.evaluation.detectors.to_model_input`,
    then :func:`ctrlora.models.latents.encode_posterior`), ``batch_size`` images at a time on the
    VAE's device; pass a VAE in eval mode. Deterministic: the mean involves no noise."""
    a = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = []
    for i in range(0, a.shape[0], batch_size):
        mean, _ = encode_posterior(vae, to_model_input(a[i:i + batch_size]), batch_size=None, out_device="cpu")
        rows.append(mean.to(torch.float32).numpy())
    return _rms_rows(np.concatenate(rows))


# -------------------------------------------------------------------------------- nearest

def _check_features(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D feature array N×D, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def nearest(
    queries: np.ndarray,
    refs: np.ndarray,
    chunk: int = 512,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the L2 distance to the nearest ``refs`` row and that row's index:
    ``(distance float64 [Nq], index int64 [Nq])``; ties go to the lower index.

    The search runs in float64 blocks of ``chunk`` queries × ``chunk`` refs on ``max(0, |q|² +
    |r|² - 2 q·r)``, so 1,000 × 2,000 × 12,288 needs a few tens of MB; the distance to the row
    found is then recomputed directly, so an exact copy reads 0. ``exclude`` (int
    ``[Nq]``) names one ref row per query to skip (e.g. the query itself when ``queries`` and
    ``refs`` are the same set); a negative entry skips nothing."""
    q = _check_features(queries, "queries")
    r = _check_features(refs, "refs")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"feature dims differ: queries have {q.shape[1]}, refs {r.shape[1]}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    nq, nr = q.shape[0], r.shape[0]
    skip: np.ndarray | None = None
    if exclude is not None:
        skip = np.asarray(exclude)
        if skip.shape != (nq,) or not np.issubdtype(skip.dtype, np.integer):
            raise ValueError(f"exclude must be {nq} integer ref indices (one per query), "
                             f"got {skip.dtype} shape {skip.shape}")
        if (skip >= nr).any():
            raise ValueError(f"exclude names ref rows beyond the {nr} refs")
        if nr < 2 and (skip >= 0).any():
            raise ValueError("exclude leaves no ref row to compare with (refs has a single row)")
    best_d2 = np.full(nq, np.inf)
    best_i = np.zeros(nq, dtype=np.int64)
    r_sq = np.einsum("ij,ij->i", r.astype(np.float64), r.astype(np.float64))
    for qs in range(0, nq, chunk):
        qb = q[qs:qs + chunk].astype(np.float64)
        qb_sq = np.einsum("ij,ij->i", qb, qb)
        rows = np.arange(qb.shape[0])
        for rs in range(0, nr, chunk):
            rb = r[rs:rs + chunk].astype(np.float64)
            d2 = qb_sq[:, None] + r_sq[None, rs:rs + rb.shape[0]] - 2.0 * (qb @ rb.T)
            np.maximum(d2, 0.0, out=d2)
            if skip is not None:
                local = skip[qs:qs + qb.shape[0]] - rs
                hit = (local >= 0) & (local < rb.shape[0])
                d2[rows[hit], local[hit]] = np.inf
            j = np.argmin(d2, axis=1)
            d = d2[rows, j]
            better = d < best_d2[qs:qs + qb.shape[0]]  # strict: an earlier block keeps a tie
            best_d2[qs:qs + qb.shape[0]][better] = d[better]
            best_i[qs:qs + qb.shape[0]][better] = j[better] + rs
        # The expanded form loses digits to cancellation (an exact copy reads ~1e-7, not 0): the
        # reported distance is recomputed directly from the difference with the chosen row.
        diff = qb - r[best_i[qs:qs + qb.shape[0]]].astype(np.float64)
        best_d2[qs:qs + qb.shape[0]] = np.einsum("ij,ij->i", diff, diff)
    return np.sqrt(best_d2), best_i


# ---------------------------------------------------------------------------------- audit

@dataclass
class AuditResult:
    """What :func:`audit` returns.

    summary: the JSON-ready report (plain floats, ints, strings, dicts; see :func:`audit`);
    generated_distance / generated_nearest: per generated image, the distance to its nearest
    training photograph and that photograph's index (float64 / int64 ``[n_generated]``);
    test_distance / test_nearest: the same for the test photographs;
    source_distance: per generated image, the distance to its own source scan (``None`` without
    ``source``)."""

    summary: dict[str, Any]
    generated_distance: np.ndarray
    generated_nearest: np.ndarray
    test_distance: np.ndarray
    test_nearest: np.ndarray
    source_distance: np.ndarray | None = None


def wilson_interval(k: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for ``k`` successes out of ``n`` (value = k / n)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(float(p), max(0.0, centre - half), min(1.0, centre + half), int(n), float(level))


def _quantiles(d: np.ndarray) -> dict[str, float]:
    return {f"p{q:g}": float(v) for q, v in zip(QUANTILES, np.percentile(d, QUANTILES))}


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _bootstrap_share(gen_d: np.ndarray, test_d: np.ndarray, percentile: float, n_boot: int, seed: int,
                     level: float) -> Interval:
    """Share of ``gen_d`` below the ``percentile``-th percentile of ``test_d``, resampling both
    sets independently (the threshold is re-estimated in every resample)."""
    thr = float(np.percentile(test_d, percentile))
    value = float(np.mean(gen_d < thr))
    gi = resample_indices(gen_d.size, n_boot, seed)
    ti = resample_indices(test_d.size, n_boot, seed + 1)
    boots = np.empty(n_boot)
    for b in range(0, n_boot, _BOOT_BLOCK):
        thr_b = np.percentile(test_d[ti[b:b + _BOOT_BLOCK]], percentile, axis=1)
        boots[b:b + _BOOT_BLOCK] = np.mean(gen_d[gi[b:b + _BOOT_BLOCK]] < thr_b[:, None], axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return Interval(value, float(lo), float(hi), int(gen_d.size), float(level))


def audit(
    generated: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    source: np.ndarray | None = None,
    percentile: float = 1.0,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 512,
) -> AuditResult:
    """Memorization audit on feature arrays (rows from :func:`pixel_features` or
    :func:`latent_features`, the same space for all three sets).

    ``source`` (int ``[n_generated]``, optional): for each generated image, the index into
    ``train`` of the scan whose condition produced it.

    ``summary`` keys:

    * ``n_generated``, ``n_train``, ``n_test``, ``feature_dim``, ``percentile``;
    * ``threshold``: the ``percentile``-th percentile of the test-to-train distances;
    * ``generated_share``: share of generated images closer to a training photograph than the
      threshold, as ``{value, low, high, n, level}`` with the two-sample bootstrap interval
      (``n_boot`` resamples, ``seed``); ``generated_below``: their count;
    * ``generated_share_wilson``: the same share with the Wilson interval at the fixed
      threshold;
    * ``test_share``: the same share for the test images (about ``percentile / 100``, a sanity
      line), ``expected_share`` = ``percentile / 100``;
    * ``generated_distance`` / ``test_distance``: quantiles ``p1``, ``p5``, ``p50`` of the
      nearest-training distances; ``median_ratio``: generated median / test median (below 1:
      generated images sit closer to the training set than new photographs do; ``None`` when the
      test median is 0);
    * ``interval_method``: the two intervals in words;
    * with ``source``, ``source``: ``nearest_is_source`` (share of generated images whose
      nearest training photograph is their own source scan, Wilson interval),
      ``distance`` (quantiles of the distance to the own source scan), ``below_threshold``
      (share of generated images closer to their own source than the threshold), and
      ``median_ratio`` (median distance to the own source / test median).
    """
    g = _check_features(generated, "generated")
    tr = _check_features(train, "train")
    te = _check_features(test, "test")
    dims = {"generated": g.shape[1], "train": tr.shape[1], "test": te.shape[1]}
    if len(set(dims.values())) != 1:
        raise ValueError(f"feature dims differ between the sets: {dims}")
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must lie in (0, 100), got {percentile}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    src: np.ndarray | None = None
    if source is not None:
        src = np.asarray(source)
        if src.shape != (g.shape[0],) or not np.issubdtype(src.dtype, np.integer):
            raise ValueError(f"source must be {g.shape[0]} integer train indices (one per generated image), "
                             f"got {src.dtype} shape {src.shape}")
        if (src < 0).any() or (src >= tr.shape[0]).any():
            raise ValueError(f"source indices must lie in [0, {tr.shape[0]}) (rows of train), "
                             f"got [{int(src.min())}, {int(src.max())}]")

    gen_d, gen_i = nearest(g, tr, chunk=chunk)
    test_d, test_i = nearest(te, tr, chunk=chunk)
    threshold = float(np.percentile(test_d, percentile))
    below = int(np.sum(gen_d < threshold))
    test_median = float(np.median(test_d))
    summary: dict[str, Any] = {
        "n_generated": int(g.shape[0]),
        "n_train": int(tr.shape[0]),
        "n_test": int(te.shape[0]),
        "feature_dim": int(g.shape[1]),
        "percentile": float(percentile),
        "threshold": threshold,
        "generated_share": _bootstrap_share(gen_d, test_d, percentile, n_boot, seed, level).to_dict(),
        "generated_below": below,
        "generated_share_wilson": wilson_interval(below, g.shape[0], level).to_dict(),
        "test_share": float(np.mean(test_d < threshold)),
        "expected_share": float(percentile) / 100.0,
        "generated_distance": _quantiles(gen_d),
        "test_distance": _quantiles(test_d),
        "median_ratio": _ratio(float(np.median(gen_d)), test_median),
        "interval_method": (
            f"generated_share: percentile bootstrap, {n_boot} resamples of generated and test images "
            f"(threshold re-estimated in each), level {level:g}; generated_share_wilson: Wilson score "
            f"interval at the fixed threshold, generated images only"),
    }
    source_d: np.ndarray | None = None
    if src is not None:
        source_d = np.sqrt(np.sum((g.astype(np.float64) - tr[src].astype(np.float64)) ** 2, axis=1))
        own = int(np.sum(gen_i == src))
        summary["source"] = {
            "nearest_is_source": wilson_interval(own, g.shape[0], level).to_dict(),
            "nearest_is_source_count": own,
            "distance": _quantiles(source_d),
            "below_threshold": float(np.mean(source_d < threshold)),
            "median_ratio": _ratio(float(np.median(source_d)), test_median),
        }
    return AuditResult(summary=summary, generated_distance=gen_d, generated_nearest=gen_i,
                       test_distance=test_d, test_nearest=test_i, source_distance=source_d)


# ----------------------------------------------------------------------------------- grid

def closest_pairs(distances: np.ndarray, n: int = 8) -> np.ndarray:
    """Indices of the ``n`` smallest ``distances`` (fewer if there are fewer), closest first;
    ties keep the lower index first."""
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"distances must be a non-empty 1-D array, got shape {d.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return np.argsort(d, kind="stable")[:n]


def closest_pairs_grid(
    generated: np.ndarray,
    train: np.ndarray,
    nearest_index: np.ndarray,
    distances: np.ndarray,
    path: str | Path,
    n: int = 8,
    *,
    source: np.ndarray | None = None,
    show_diff: bool = True,
    diff_gain: float = 4.0,
    threshold: float | None = None,
    scale: int | None = None,
) -> Path:
    """PNG grid of the ``n`` generated images closest to a training photograph, one row each:
    the generated image, its nearest training photograph (``train[nearest_index[i]]``) and, with
    ``show_diff``, their absolute difference times ``diff_gain`` (black = identical). The row
    label gives the generated and training indices, the distance, ``< thr`` when it is below
    ``threshold`` (the audit's ``summary["threshold"]``, when given), and ``own scan`` when
    ``source`` says the training photograph is the one the image was generated from.

    ``generated`` and ``train`` are uint8 ``N×H×W×3`` photographs; ``nearest_index`` and
    ``distances`` come from :func:`audit` (``generated_nearest``, ``generated_distance``) or
    :func:`nearest`. Drawn with :func:`ctrlora.evaluation.grids.save_grid`; returns the path."""
    gen = _check_images(generated, "generated")
    tr = _check_images(train, "train")
    if gen.shape[1:] != tr.shape[1:]:
        raise ValueError(f"generated and train images differ in size: {gen.shape[1:]} vs {tr.shape[1:]}")
    idx = np.asarray(nearest_index)
    d = np.asarray(distances, dtype=np.float64)
    if idx.shape != (gen.shape[0],) or d.shape != (gen.shape[0],):
        raise ValueError(f"nearest_index and distances must have one entry per generated image ({gen.shape[0]}), "
                         f"got shapes {idx.shape} and {d.shape}")
    if not np.issubdtype(idx.dtype, np.integer) or (idx < 0).any() or (idx >= tr.shape[0]).any():
        raise ValueError(f"nearest_index must be integer rows of train in [0, {tr.shape[0]})")
    src = None if source is None else np.asarray(source)
    if src is not None and src.shape != (gen.shape[0],):
        raise ValueError(f"source must have one entry per generated image ({gen.shape[0]}), got shape {src.shape}")
    rows, labels = [], []
    for i in closest_pairs(d, n):
        j = int(idx[i])
        row = [gen[i], tr[j]]
        if show_diff:
            diff = np.abs(gen[i].astype(np.float32) - tr[j].astype(np.float32)) * diff_gain
            row.append(np.clip(diff, 0, 255).astype(np.uint8))
        rows.append(row)
        label = f"g{i}>t{j}\nd {d[i]:.4f}"
        if threshold is not None and d[i] < threshold:
            label += "\n< thr"
        if src is not None and int(src[i]) == j:
            label += "\nown scan"
        labels.append(label)
    titles = ["generated", "nearest train"] + ([f"|diff| x{diff_gain:g}"] if show_diff else [])
    return save_grid(rows, path, titles=titles, row_labels=labels, scale=scale)
