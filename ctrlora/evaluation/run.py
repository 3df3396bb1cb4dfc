"""The evaluation run: generate on the held-out scans with every condition, the combination and
the baselines, score condition fidelity and image metrics, check the quality bar, draw grids.

Plain library (no DVC / MLflow): the ``evaluate`` stage (``pipelines/evaluate.py``) loads the
models from disk with :func:`load_models` and calls :func:`run_evaluation`.

Protocol
--------
* Held-out scans: the ``test`` split of ``data/prepared`` (capped at ``max_scans``, in scan-id
  order), every condition image, the photograph (ground truth), the caption (the prompt) and, for
  segmentation, the raw label map of the scan (``<source>/<scan_id>/segmentation.png``).
* Re-detectors: trained once on the ``train`` split (:func:`get_detectors`), cached in a
  directory keyed by their configuration and training scans.
* Sampling: DDIM, ``steps``, CFG ``guidance_scale`` (the unconditional branch keeps the
  condition), the scan's caption as prompt, **one fixed seed per scan** (``seed + index``) shared
  by every model, so every model draws the same initial noise for a scan.
* Fidelity (:func:`~ctrlora.evaluation.fidelity.condition_fidelity`) against the condition fed
  in; ``fidelity`` = its primary metric. Image metrics against the photograph:
  ``image_psnr``, ``image_ssim``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .detectors import CannyParams, load_detector, save_detector, train_detector
from .fidelity import DETECTED_CONDITIONS, condition_fidelity, default_detector_config, image_metrics, primary_fidelity
from .grids import colorize_labels, plot_curves, save_grid
from .quality_bar import evaluate_quality_bar

__all__ = ["EvalData", "SamplingConfig", "EvalConfig", "EvalModels", "load_split", "get_detectors", "generate",
           "score", "load_models", "run_evaluation", "ablation_summary", "derived_extractor"]

BASE_ONLY = "__base__"


# ---------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """Scans of one split. ``photos``/``conditions[c]``: uint8 ``N×H×W×3`` (the prepared images);
    ``labels``: int64 ``N×H×W`` raw segmentation label maps (when segmentation is asked for)."""

    scan_ids: list[str]
    captions: list[str]
    photos: np.ndarray
    conditions: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scan_ids)

    def subset(self, n: int) -> "EvalData":
        return EvalData(self.scan_ids[:n], self.captions[:n], self.photos[:n],
                        {c: v[:n] for c, v in self.conditions.items()},
                        None if self.labels is None else self.labels[:n])


def _read(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode != mode:
            raise ValueError(f"{path}: mode {im.mode}, expected {mode}")
        return np.asarray(im).copy()


def load_split(prepared_root: str | Path, split: str, conditions: Sequence[str],
               scan_sources: Sequence[str | Path] = (), max_scans: int | None = None,
               progress: bool = True) -> EvalData:
    """The scans of ``split`` that have every one of ``conditions`` (scan-id order, first
    ``max_scans``). Segmentation also needs the raw label maps: each scan's folder is looked up in
    ``scan_sources`` (the folders ``prepare`` read, e.g. ``data/rendered``, ``data/scans``)."""
    from ctrlora.data.pairs import read_pairs

    root = Path(prepared_root)
    if not conditions:
        raise ValueError("load_split: no conditions")
    rows = {c: {r["scan_id"]: r for r in read_pairs(root, c, split)} for c in conditions}
    ids = sorted(set.intersection(*(set(r) for r in rows.values())))
    if max_scans:
        ids = ids[: int(max_scans)]
    if not ids:
        raise ValueError(f"{root}: no {split} scans with all of {list(conditions)}")
    first = rows[conditions[0]]
    photos, conds = [], {c: [] for c in conditions}
    labels = [] if "segmentation" in conditions else None
    sources = [Path(s) for s in scan_sources]
    for sid in tqdm(ids, desc=f"load {split}", disable=not progress, leave=False):
        photos.append(_read(root / first[sid]["photo"], "RGB"))
        for c in conditions:
            conds[c].append(_read(root / rows[c][sid]["condition"], "RGB"))
        if labels is not None:
            found = [s / sid / "segmentation.png" for s in sources if (s / sid / "segmentation.png").is_file()]
            if not found:
                raise FileNotFoundError(f"scan {sid!r}: no raw segmentation.png under any of {[str(s) for s in sources]} "
                                        "(segmentation fidelity compares label maps; pass the scan folders)")
            labels.append(_read(found[0], "L").astype(np.int64))
    return EvalData(ids, [first[s]["caption"] for s in ids], np.stack(photos),
                    {c: np.stack(v) for c, v in conds.items()}, None if labels is None else np.stack(labels))


def derived_extractor(condition: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Re-extractor of a derived condition from ``N×H×W×3`` images in [0, 1] (the data's own
    functions), or ``None`` for conditions that are not derived-with-extractor."""
    from ctrlora.data import conditions as C

    if condition == "grayscale":
        return lambda g: np.repeat(np.clip(C.grayscale01(g), 0, 1)[..., None], 3, -1).astype(np.float32)
    if condition == "blur":
        return lambda g: np.stack([np.clip(C.gaussian_blur(x), 0, 1) for x in g]).astype(np.float32)
    if condition == "palette":
        return lambda g: np.stack([C.quantise_palette(np.round(x * 255).astype(np.uint8)) for x in g]
                                  ).astype(np.float32) / 255.0
    return None


def fidelity_truth(condition: str, data: EvalData) -> np.ndarray:
    """The data :func:`condition_fidelity` compares the re-detection with."""
    if condition == "segmentation":
        if data.labels is None:
            raise ValueError("segmentation fidelity needs the raw label maps (load_split with scan_sources)")
        return data.labels
    return data.conditions[condition]


def detector_targets(condition: str, data: EvalData) -> np.ndarray:
    if condition == "segmentation":
        return fidelity_truth(condition, data)
    img = data.conditions[condition].astype(np.float32) / 255.0
    return img[..., 0] if DETECTED_CONDITIONS[condition][1] == 1 else img


# ---------------------------------------------------------------------------- detectors
def get_detectors(conditions: Sequence[str], train: EvalData, cache_dir: str | Path | None,
                  overrides: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """A trained re-detector per detected condition (segmentation, lighting, depth, normal) among
    ``conditions``. With ``cache_dir``, a detector is loaded from ``<cache_dir>/<c>`` when its
    configuration and training scans match, else trained and saved there."""
    ids_hash = hashlib.sha256("\n".join(train.scan_ids).encode()).hexdigest()[:16]
    out = {}
    for c in conditions:
        if c not in DETECTED_CONDITIONS:
            continue
        cfg = default_detector_config(c, **dict(overrides or {}))
        key = {"config": asdict(cfg), "train_scans": len(train), "train_ids_sha256": ids_hash}
        d = Path(cache_dir) / c if cache_dir else None
        if d is not None and (d / "train_key.json").is_file() and json.loads((d / "train_key.json").read_text()) == key:
            out[c] = load_detector(d)
            continue
        model = train_detector(cfg, train.photos, detector_targets(c, train), progress=progress)
        if d is not None:
            save_detector(model, d)
            (d / "train_key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
        out[c] = model
    return out


# ---------------------------------------------------------------------------- sampling
@dataclass
class SamplingConfig:
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


def score(condition: str, generated: np.ndarray, data: EvalData, detectors: Mapping[str, Any],
          canny: CannyParams | None = None, image: bool = True) -> dict[str, float]:
    """``{"fidelity": primary, <fidelity metrics>, "image_psnr", "image_ssim"}`` of one set of
    generated images against ``condition`` (and the photographs)."""
    fid = condition_fidelity(condition, generated, fidelity_truth(condition, data), detectors,
                             canny=canny or CannyParams(), extractor=derived_extractor(condition))
    out = {"fidelity": primary_fidelity(condition, fid), **fid}
    if image:
        im = image_metrics(generated, data.photos)
        out.update(image_psnr=im["psnr"], image_ssim=im["ssim"])
    return {k: round(float(v), 6) for k, v in out.items()}


# ---------------------------------------------------------------------------- models
@dataclass
class EvalModels:
    """What is evaluated. ``controlnet`` holds an adapter per condition (base conditions' from
    ``models/base/adapters``, new ones' from ``models/adapters``). Baselines (each optional):
    ``random_base`` (a ControlNet holding the condition's adapter), ``full_finetune`` (plain
    ControlNet), ``cnn`` / ``vae_scratch`` (``{step: plain ControlNet}``)."""

    backbone: Any
    controlnet: Any
    trainable_params: dict[str, int] = field(default_factory=dict)  # new condition -> adapter size
    random_base: Any = None
    full_finetune: Any = None
    cnn: dict[int, Any] = field(default_factory=dict)
    vae_scratch: dict[int, Any] = field(default_factory=dict)
    baseline_params: dict[str, int] = field(default_factory=dict)  # baseline -> trainable params


def load_models(backbone_dir: str | Path, base_dir: str | Path, adapter_dirs: Mapping[str, str | Path],
                baselines_dir: str | Path | None = None, baseline_condition: str | None = None,
                baseline_names: Sequence[str] = ("random_base", "full_finetune", "cnn", "vae_scratch")) -> EvalModels:
    """Load the backbone, the base with every adapter (``{condition: adapter_dir}``; each must
    record this base's hash) and the baselines written by ``pipelines/train_baseline.py``."""
    from ctrlora.models import adapters as A
    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet

    bb = load_backbone(backbone_dir)
    cn = CtrLoRAControlNet.from_pretrained(base_dir)
    want = A.base_hash(cn)
    params = {}
    for c, d in adapter_dirs.items():
        A.load_adapter(cn, d, name=c, expected_base_hash=want)
        params[c] = int(A.read_adapter_config(d)["num_params"])
    A.set_adapter(cn, None)
    cn.eval()
    models = EvalModels(bb, cn, trainable_params=params)
    if baselines_dir is None:
        return models
    root = Path(baselines_dir)
    for name in baseline_names:
        d = root / name
        if not (d / "baseline.json").is_file():
            raise FileNotFoundError(f"{d}: baseline {name!r} not trained (no baseline.json); run train_baseline@{name}")
        info = json.loads((d / "baseline.json").read_text())
        if baseline_condition and info["condition"] != baseline_condition:
            raise ValueError(f"{d}: baseline trained on {info['condition']!r}, evaluation expects {baseline_condition!r}")
        models.baseline_params[name] = int(info["trainable_params"])
        if name == "random_base":
            m = CtrLoRAControlNet.from_pretrained(d / "base")
            A.load_adapter(m, d / "adapter", name=info["condition"])
            models.random_base = m.eval()
        elif name == "full_finetune":
            models.full_finetune = CtrLoRAControlNet.from_pretrained(d / "controlnet").eval()
        else:
            getattr(models, name).update({int(s): CtrLoRAControlNet.from_pretrained(d / f"step_{int(s):05d}").eval()
                                          for s in info["save_steps"]})
    return models


# ---------------------------------------------------------------------------- the run
@dataclass
class EvalConfig:
    base_conditions: list[str]
    new_conditions: list[str]
    combined: dict[str, float] = field(default_factory=lambda: {"segmentation": 1.0, "lighting": 1.0})
    baseline_condition: str | None = "lighting"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ablation_max_scans: int | None = None  # scans for the cnn / vae_scratch step curves (None: all)
    grid_rows: int = 8
    canny: CannyParams = field(default_factory=CannyParams)

    @property
    def conditions(self) -> list[str]:
        return [*self.base_conditions, *self.new_conditions]


def _cell(condition: str, data: EvalData, i: int) -> np.ndarray:
    if condition == "segmentation" and data.labels is not None:
        return colorize_labels(data.labels[i])
    return data.conditions[condition][i]


def ablation_summary(curve: Sequence[tuple[int, float]]) -> dict[str, float | None]:
    """Convergence of a fidelity-vs-steps curve whose first point is step 0 (no control):
    ``final``, ``steps_to_90pct`` (first step reaching 90 % of the total gain), ``max_jump_fraction``
    (the largest share of the total gain made between two consecutive points; near 1 = a sudden
    jump). Gain-based figures are ``None`` when the curve gains nothing."""
    pts = sorted(curve)
    f0, final = pts[0][1], pts[-1][1]
    gain = final - f0
    out: dict[str, float | None] = {"final": round(final, 6), "gain": round(gain, 6)}
    if gain <= 1e-9:
        out.update(steps_to_90pct=None, max_jump_fraction=None)
        return out
    out["steps_to_90pct"] = float(next(s for s, f in pts if f - f0 >= 0.9 * gain))
    out["max_jump_fraction"] = round(max((b[1] - a[1]) / gain for a, b in zip(pts, pts[1:])), 6)
    return out


def run_evaluation(models: EvalModels, test: EvalData, detectors: Mapping[str, Any], cfg: EvalConfig,
                   reports_dir: str | Path | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything of the ``evaluate`` stage after loading: returns the ``metrics/evaluate.json``
    dict and, with ``reports_dir``, writes the grids (PNG) and ``fidelity_vs_steps.csv`` / ``.png``
    there."""
    from ctrlora.pipeline import CtrLoRAPipeline

    missing = [c for c in cfg.new_conditions if c not in models.trainable_params]
    if missing:
        raise ValueError(f"no adapter sizes for new conditions {missing}")
    reports = Path(reports_dir) if reports_dir else None
    s = cfg.sampling
    rows = min(cfg.grid_rows, len(test))
    pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet)
    pipe.set_progress_bar_config(disable=True)
    metrics: dict[str, Any] = {}
    images: dict[str, np.ndarray] = {}

    def grid(name, cols, titles):
        if reports is not None:
            save_grid([[col[i] for col in cols] for i in range(rows)], reports / f"{name}.png", titles=titles)

    photos = [test.photos[i] for i in range(rows)]
    # -- single conditions through their adapters
    for c in cfg.conditions:
        gen = generate(pipe, test, {c: (c, 1.0, c)}, s, desc=f"generate {c}", progress=progress)
        images[c] = gen
        metrics[c] = {**score(c, gen, test, detectors, cfg.canny), "n_scans": len(test)}
        if c in cfg.new_conditions:
            metrics[c]["trainable_params"] = models.trainable_params[c]
        log(f"[evaluate] {c}: fidelity {metrics[c]['fidelity']:.4f}")
        grid(c, [[_cell(c, test, i) for i in range(rows)], gen[:rows], photos], [c, "generated", "ground truth"])

    # -- the combination
    if cfg.combined:
        names = list(cfg.combined)
        gen = generate(pipe, test, {c: (c, w, c) for c, w in cfg.combined.items()}, s, desc="generate combined",
                       progress=progress)
        images["combined"] = gen
        comb: dict[str, Any] = {c: score(c, gen, test, detectors, cfg.canny, image=False) for c in names}
        im = image_metrics(gen, test.photos)
        comb["image_psnr"], comb["image_ssim"] = round(im["psnr"], 6), round(im["ssim"], 6)
        comb["weights"] = {c: float(w) for c, w in cfg.combined.items()}
        metrics["combined"] = comb
        log("[evaluate] combined: " + ", ".join(f"{c} {comb[c]['fidelity']:.4f}" for c in names))
        grid("combined", [*[[_cell(c, test, i) for i in range(rows)] for c in names], gen[:rows], photos],
             [*names, "generated", "ground truth"])

    # -- baselines
    bl: dict[str, Any] = {}
    gen = generate(pipe, test, {}, s, desc="generate uncontrolled", progress=progress)
    images["uncontrolled"] = gen
    im = image_metrics(gen, test.photos)
    bl["uncontrolled"] = {c: score(c, gen, test, detectors, cfg.canny, image=False) for c in cfg.conditions}
    bl["uncontrolled"]["image_psnr"], bl["uncontrolled"]["image_ssim"] = round(im["psnr"], 6), round(im["ssim"], 6)
    grid("uncontrolled", [gen[:rows], photos], ["no control", "ground truth"])
    bc = cfg.baseline_condition
    cols, titles = [], []
    for name, cn, adapter in (("random_base", models.random_base, bc), ("full_finetune", models.full_finetune, BASE_ONLY)):
        if cn is None:
            continue
        if bc is None:
            raise ValueError(f"baseline {name} given but no baseline_condition")
        p = CtrLoRAPipeline.from_components(models.backbone, cn)
        gen = generate(p, test, {bc: (bc, 1.0, adapter)}, s, desc=f"generate {name}", progress=progress)
        images[name] = gen
        bl[name] = {**score(bc, gen, test, detectors, cfg.canny), "trainable_params": models.baseline_params[name]}
        log(f"[evaluate] baseline {name} ({bc}): fidelity {bl[name]['fidelity']:.4f}")
        cols.append(gen[:rows])
        titles.append(name)
    if cols:
        grid(f"baselines_{bc}", [[_cell(bc, test, i) for i in range(rows)], *cols, images[bc][:rows], photos],
             [bc, *titles, "adapter", "ground truth"])

    # -- embedding ablation: fidelity against training steps (step 0 = zero convs = no control)
    if models.cnn or models.vae_scratch:
        sub = test.subset(cfg.ablation_max_scans or len(test))
        n0 = len(sub)
        f0 = score(bc, images["uncontrolled"][:n0], sub, detectors, cfg.canny, image=False)["fidelity"]
        curves: dict[str, list[tuple[int, float]]] = {}
        for name in ("cnn", "vae_scratch"):
            snaps = getattr(models, name)
            if not snaps:
                continue
            entry: dict[str, Any] = {}
            curve = [(0, f0)]
            for step in sorted(snaps):
                p = CtrLoRAPipeline.from_components(models.backbone, snaps[step])
                gen = generate(p, sub, {bc: (bc, 1.0, BASE_ONLY)}, s, desc=f"generate {name}@{step}", progress=progress)
                r = score(bc, gen, sub, detectors, cfg.canny)
                entry[f"step_{step:05d}"] = r
                curve.append((step, r["fidelity"]))
                images[f"{name}@{step}"] = gen
                log(f"[evaluate] {name}@{step}: fidelity {r['fidelity']:.4f}")
            entry["summary"] = ablation_summary(curve)
            entry["trainable_params"] = models.baseline_params.get(name)
            entry["n_scans"] = n0
            bl[name] = entry
            curves[name] = curve
        if reports is not None:
            steps = sorted({st for cv in curves.values() for st, _ in cv})
            lines = ["step," + ",".join(curves)]
            for st in steps:
                lines.append(f"{st}," + ",".join(
                    next((f"{f:.6f}" for x, f in cv if x == st), "") for cv in curves.values()))
            reports.mkdir(parents=True, exist_ok=True)
            (reports / "fidelity_vs_steps.csv").write_text("\n".join(lines) + "\n")
            plot_curves(curves, reports / "fidelity_vs_steps.png",
                        title=f"{bc} fidelity vs training steps (step 0 = no control)", ylabel="fidelity")
            last = {name: images[f"{name}@{max(getattr(models, name))}"] for name in curves}
            r2 = min(rows, n0)
            grid_cols = [[_cell(bc, sub, i) for i in range(r2)], *[v[:r2] for v in last.values()], photos[:r2]]
            save_grid([[col[i] for col in grid_cols] for i in range(r2)], reports / "embedding_ablation.png",
                      titles=[bc, *[f"{k} final" for k in last], "ground truth"])
    metrics["baselines"] = bl
    metrics["quality_bar"] = evaluate_quality_bar(
        metrics, cfg.conditions, cfg.new_conditions,
        bc if (models.random_base is not None or models.full_finetune is not None) else None,
        list(cfg.combined) if cfg.combined else None)
    return metrics


def json_ready(x: Any) -> Any:
    """Numbers → plain floats / ints (NaN → None), for ``json.dumps``."""
    if isinstance(x, Mapping):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    return x
