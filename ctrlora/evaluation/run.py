"""The evaluation run: does each adapter control the image, and does the control survive the
combination? Plain library (no DVC / MLflow); the ``evaluate`` stage (``pipelines/stages/evaluate.py``)
calls the phases in order:

1. loading (:mod:`.loading`): the test split and the models;
2. detectors (:mod:`.detector_cache`): re-detectors trained once on the training split;
3. generation (:mod:`.generation`): per guidance scale, one pass without control, one per
   condition through its adapter and one with the combination — every image generated once and
   shared by every check that reads it, every scan with its own fixed seed (``seed + index``);
4. scoring (:mod:`.scoring`): per-scan fidelity and image metrics;
5. checks (:mod:`.stats`, :mod:`.quality_bar`): paired bootstrap intervals and the bar, read at
   the gate guidance;
6. grids (:mod:`.grids`): condition | generated | no control | ground truth.

The returned dict is ``metrics/evaluate.json``; its layout is described in docs/evaluation.md.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .detector_cache import get_detectors, load_detectors
from .detectors import CannyParams
from .fidelity import PRIMARY_METRIC
from .generation import SamplingConfig, generate
from .grids import save_grid
from .loading import EvalData, EvalModels, condition_cell, load_models, load_split
from .quality_bar import LEVEL, quality_bar
from .scoring import means, per_scan_fidelity, per_scan_image_scores, scan_scores
from .stats import Interval, bootstrap_diff, bootstrap_gain_ratio

__all__ = ["EvalData", "EvalModels", "SamplingConfig", "EvalConfig", "load_split", "load_models",
           "get_detectors", "load_detectors", "generate", "per_scan_fidelity", "score_pass", "summarize_pass",
           "GenerationJob", "generation_jobs", "pass_controls", "run_job", "run_evaluation", "guidance_key", "json_ready",
           "TestSplit", "load_test_split"]

UNCONTROLLED, COMBINED = "uncontrolled", "combined"


@dataclass
class EvalConfig:
    """``guidance``: CFG scales evaluated; ``gate_guidance`` (one of them) is the one the quality
    bar and the registry read. Passes at any other scale use the first
    ``other_guidance_max_scans`` scans (``None``: all). ``n_boot`` / ``bootstrap_seed``: the paired
    bootstrap (the level is the bar's, 95 %). ``sampling.guidance_scale`` is ignored.
    ``condition_weights``: the residual weight (ControlNet conditioning scale) of each condition's
    own pass (missing: 1.0); the combination uses ``combined``'s weights."""

    base_conditions: list[str]
    new_conditions: list[str]
    combined: dict[str, float] = field(default_factory=lambda: {"segmentation": 1.0, "lighting": 1.0})
    condition_weights: dict[str, float] = field(default_factory=dict)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    guidance: list[float] = field(default_factory=lambda: [1.0, 7.5])
    gate_guidance: float = 1.0
    other_guidance_max_scans: int | None = 64
    n_boot: int = 2000
    bootstrap_seed: int = 0
    grid_rows: int = 8
    canny: CannyParams = field(default_factory=CannyParams)

    def __post_init__(self) -> None:
        self.guidance = [float(g) for g in self.guidance]
        if self.gate_guidance not in self.guidance:
            raise ValueError(f"gate_guidance {self.gate_guidance} is not among the evaluated guidance {self.guidance}")
        if len(set(self.guidance)) != len(self.guidance) or min(self.guidance) < 1.0:
            raise ValueError(f"guidance must be distinct scales ≥ 1, got {self.guidance}")
        unknown = sorted(set(self.combined) - set(self.conditions))
        if unknown:
            raise ValueError(f"combined names conditions without an adapter: {unknown}")
        unknown = sorted(set(self.condition_weights) - set(self.conditions))
        if unknown:
            raise ValueError(f"condition_weights names conditions without an adapter: {unknown}")
        if any(float(w) <= 0 for w in self.condition_weights.values()):
            raise ValueError(f"condition_weights must be > 0, got {self.condition_weights}")

    @classmethod
    def from_params(cls, section: Mapping[str, Any], base_conditions: Sequence[str], new_conditions: Sequence[str],
                    also: Sequence[str] = ()) -> "EvalConfig":
        """From params.yaml ``evaluate`` and the condition lists of ``train_base`` /
        ``train_adapter``; ``also``: the section's other keys, which the caller reads. Every key
        of the config is stated there: a missing or unknown one is refused by name (never a silent
        library default). ``sampling.guidance_scale``, where given, is ignored (see the class)."""
        from ctrlora.params import checked_section

        p = checked_section("evaluate", section, ("combined", "condition_weights", "sampling", "guidance",
                                                  "gate_guidance", "other_guidance_max_scans", "bootstrap",
                                                  "grid_rows", *also))
        sampling = checked_section("evaluate.sampling", p["sampling"], ("steps", "scheduler", "batch_size", "seed"),
                                   ("guidance_scale",))
        boot = checked_section("evaluate.bootstrap", p["bootstrap"], ("n_boot", "seed"))
        return cls(list(base_conditions), list(new_conditions),
                   combined={str(k): float(v) for k, v in (p["combined"] or {}).items()},
                   condition_weights={str(k): float(v) for k, v in (p["condition_weights"] or {}).items()},
                   sampling=SamplingConfig(**{k: v for k, v in sampling.items() if k != "guidance_scale"}),
                   guidance=list(p["guidance"]), gate_guidance=float(p["gate_guidance"]),
                   other_guidance_max_scans=p["other_guidance_max_scans"], n_boot=int(boot["n_boot"]),
                   bootstrap_seed=int(boot["seed"]), grid_rows=int(p["grid_rows"]))

    def weight(self, condition: str) -> float:
        """The residual weight of ``condition``'s own pass."""
        return float(self.condition_weights.get(condition, 1.0))

    @property
    def conditions(self) -> list[str]:
        return [*self.base_conditions, *self.new_conditions]

    def passes(self, n_scans: int) -> list[tuple[float, int]]:
        """``(guidance, scans)`` in run order: the gate first, on every scan."""
        other = min(n_scans, self.other_guidance_max_scans or n_scans)
        return [(self.gate_guidance, n_scans)] + [(g, other) for g in self.guidance if g != self.gate_guidance]


@dataclass
class TestSplit:
    """The scans a run evaluates: ``data`` holds every scan of the split that has at least one
    evaluated condition, in scan-id order, and scan i gets seed ``seed + i`` in every pass and
    model, so every comparison stays paired; ``has[c]`` marks the scans that have condition c. A
    clinic scan may lack some conditions (its images of those are zeros and never read): each
    condition is scored on the scans that have it, the combination on those that have all of its
    conditions, the uncontrolled images are made for every scan some model reads."""

    data: EvalData
    has: dict[str, np.ndarray]  # condition -> bool [N]

    def __len__(self) -> int:
        return len(self.data)

    @classmethod
    def complete(cls, data: EvalData) -> "TestSplit":
        """Every scan of ``data`` has every one of its conditions."""
        return cls(data, {c: np.ones(len(data), dtype=bool) for c in data.conditions})

    def rows(self, conditions: Sequence[str], n: int) -> np.ndarray:
        """Indices of the first ``n`` scans that have every one of ``conditions``."""
        mask = np.ones(len(self.data), dtype=bool)
        for c in conditions:
            if c not in self.has:
                raise ValueError(f"condition {c!r} was not loaded (loaded: {sorted(self.has)})")
            mask &= self.has[c]
        return np.flatnonzero(mask)[: int(n)]


def load_test_split(prepared_root: str | Path, split: str, conditions: Sequence[str],
                    scan_sources: Sequence[str | Path] = (), max_scans: int | None = None,
                    progress: bool = True) -> TestSplit:
    """The scans of ``split`` that have any of ``conditions`` (scan-id order, the first
    ``max_scans``), each condition's images where the scan has it. A condition no scan has is an
    error naming it."""
    per = {c: load_split(prepared_root, split, [c], scan_sources, None, progress) for c in conditions}
    ids = sorted(set().union(*(d.scan_ids for d in per.values())))
    if max_scans:
        ids = ids[: int(max_scans)]
    where = {c: {sid: i for i, sid in enumerate(d.scan_ids)} for c, d in per.items()}
    first = [next((c, where[c][sid]) for c in conditions if sid in where[c]) for sid in ids]
    photos = np.stack([per[c].photos[i] for c, i in first])
    has = {c: np.array([sid in where[c] for sid in ids], dtype=bool) for c in conditions}
    images = {}
    for c, d in per.items():
        images[c] = np.zeros((len(ids), *d.conditions[c].shape[1:]), dtype=d.conditions[c].dtype)
        at = [k for k, sid in enumerate(ids) if sid in where[c]]
        images[c][at] = d.conditions[c][[where[c][ids[k]] for k in at]]
    labels = None
    seg_labels = per["segmentation"].labels if "segmentation" in per else None
    if seg_labels is not None:
        labels = np.zeros((len(ids), *seg_labels.shape[1:]), dtype=seg_labels.dtype)
        at = [k for k, sid in enumerate(ids) if sid in where["segmentation"]]
        labels[at] = seg_labels[[where["segmentation"][ids[k]] for k in at]]
    empty = [c for c in conditions if not has[c].any()]
    if empty:
        raise ValueError(f"{prepared_root}: none of the first {len(ids)} {split} scans has {empty}")
    data = EvalData(ids, [per[c].captions[i] for c, i in first], photos, images, labels)
    return TestSplit(data, has)


def _take(data: EvalData, rows: np.ndarray) -> EvalData:
    """The scans ``rows`` of ``data`` (a slice, without copying, when they are consecutive)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        sl: Any = slice(int(rows[0]), int(rows[-1]) + 1)
        ids, captions = data.scan_ids[sl], data.captions[sl]
    else:
        sl = rows
        ids, captions = [data.scan_ids[i] for i in rows], [data.captions[i] for i in rows]
    return EvalData(ids, captions, data.photos[sl], {c: v[sl] for c, v in data.conditions.items()},
                    None if data.labels is None else data.labels[sl])


def _positions(rows: np.ndarray, within: np.ndarray) -> np.ndarray:
    """Where each of ``rows`` sits in ``within`` (both sorted, ``rows`` a subset)."""
    return np.searchsorted(within, rows)


def pass_rows(cfg: "EvalConfig", test: TestSplit, n_scans: int) -> dict[str, np.ndarray]:
    """The scans each model of a pass on the first ``n_scans`` reads: a condition its own first
    ``n_scans``, the combination the first ``n_scans`` having all of its conditions, no control
    every scan one of them reads."""
    rows = {c: test.rows([c], n_scans) for c in cfg.conditions}
    if cfg.combined:
        rows[COMBINED] = test.rows(list(cfg.combined), n_scans)
    rows[UNCONTROLLED] = np.unique(np.concatenate(list(rows.values()))) if rows else np.arange(0)
    return rows


def guidance_key(g: float) -> str:
    """JSON key of a guidance scale: ``"1.0"``, ``"7.5"``."""
    return str(float(g))


# ---------------------------------------------------------------------------- generation
Controls = dict[str, tuple[str, float, str]]  # condition -> (data key, residual weight, adapter)


@dataclass(frozen=True)
class GenerationJob:
    """One pass of generation: the test scans ``rows`` (indices of the split; ``n_scans`` of them)
    at ``guidance`` under ``controls`` (empty: no control); ``model`` names the images (a
    condition, ``uncontrolled``, ``combined``)."""

    guidance: float
    n_scans: int
    model: str
    controls: Controls
    rows: tuple[int, ...] = ()


# runs a list of jobs and returns their images in job order: how the stage spreads generation over
# processes; the default runs them one after the other with the run's own pipeline
JobRunner = Callable[[list[GenerationJob]], list[np.ndarray]]


def pass_controls(cfg: EvalConfig) -> dict[str, Controls]:
    """What one guidance scale generates: ``uncontrolled``, each condition through its own adapter
    (at ``cfg.weight(c)``), and ``combined`` (the combination's adapters and weights)."""
    out: dict[str, Controls] = {UNCONTROLLED: {}}
    out.update({c: {c: (c, cfg.weight(c), c)} for c in cfg.conditions})
    if cfg.combined:
        out[COMBINED] = {c: (c, float(w), c) for c, w in cfg.combined.items()}
    return out


def _split(test: EvalData | TestSplit) -> TestSplit:
    return test if isinstance(test, TestSplit) else TestSplit.complete(test)


def generation_jobs(cfg: EvalConfig, test: EvalData | TestSplit) -> list[GenerationJob]:
    """Every job of the run, pass by pass (the gate first), each on the scans its model reads."""
    split = _split(test)
    jobs = []
    for g, n in cfg.passes(len(split)):
        rows = pass_rows(cfg, split, n)
        jobs += [GenerationJob(g, len(rows[model]), model, controls, tuple(int(i) for i in rows[model]))
                 for model, controls in pass_controls(cfg).items()]
    return jobs


def run_job(pipe, test: EvalData | TestSplit, job: GenerationJob, sampling: SamplingConfig,
            progress: bool = False) -> np.ndarray:
    """The images of one job: scan i of the split gets seed ``seed + i`` whichever scans the job
    holds (one generate call per run of consecutive scans)."""
    data = _split(test).data
    s = replace(sampling, guidance_scale=float(job.guidance))
    rows = np.asarray(job.rows, dtype=np.int64)
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
    out = [generate(pipe, _take(data, run), job.controls, replace(s, seed=s.seed + int(run[0])),
                    desc=f"generate {job.model}@{job.guidance:g}", progress=progress) for run in runs]
    if not out:
        raise ValueError(f"generation job {job.model}@{job.guidance:g} holds no scans")
    return np.concatenate(out)


# ---------------------------------------------------------------------------- scoring
@dataclass
class PassScores:
    """Per-scan scores of one pass. ``fidelity[model][condition]``: ``{metric: [N]}`` where model
    is a condition (its own adapter), ``uncontrolled`` or ``combined``, over the scans
    ``scan_ids[condition]`` (the combined model: ``scan_ids["combined"]``); ``image[model]``:
    ``{"image_psnr", "image_ssim": [N]}`` over the scans that model read; ``on_combined[c]``: the
    primary metric of c's own adapter and of no control on the combination's scans."""

    fidelity: dict[str, dict[str, dict[str, np.ndarray]]]
    image: dict[str, dict[str, np.ndarray]]
    scan_ids: dict[str, list[str]] = field(default_factory=dict)
    on_combined: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def primary(self, model: str, condition: str) -> np.ndarray:
        return self.fidelity[model][condition][PRIMARY_METRIC[condition]]


def score_pass(images: Mapping[str, np.ndarray], test: EvalData | TestSplit, detectors: Mapping[str, Any],
               cfg: EvalConfig, rows: Mapping[str, np.ndarray] | None = None) -> PassScores:
    """Score each condition on its own images and on the uncontrolled ones, over the scans that
    have it, and each combined condition on the combined images. ``rows``: the scans of each
    model (:func:`pass_rows`; default: every scan of ``test`` for every model)."""
    split = _split(test)
    rows = pass_rows(cfg, split, len(split)) if rows is None else rows
    unc_rows = rows[UNCONTROLLED]
    fid: dict[str, dict[str, dict[str, np.ndarray]]] = {UNCONTROLLED: {}, COMBINED: {}}
    ids: dict[str, list[str]] = {}
    for c in cfg.conditions:
        view = _take(split.data, rows[c])
        ids[c] = view.scan_ids
        fid[c] = {c: scan_scores(c, images[c], view, detectors, cfg.canny)}
        fid[UNCONTROLLED][c] = scan_scores(c, images[UNCONTROLLED][_positions(rows[c], unc_rows)], view, detectors,
                                           cfg.canny)
    on_combined = {}
    if cfg.combined:
        view = _take(split.data, rows[COMBINED])
        ids[COMBINED] = view.scan_ids
        for c in cfg.combined:
            fid[COMBINED][c] = scan_scores(c, images[COMBINED], view, detectors, cfg.canny)
            at = _positions(rows[COMBINED], rows[c])
            on_combined[c] = (fid[c][c][PRIMARY_METRIC[c]][at], fid[UNCONTROLLED][c][PRIMARY_METRIC[c]][at])
    image = {m: per_scan_image_scores(im, _take(split.data, rows[m])) for m, im in images.items()}
    return PassScores(fid, image, ids, on_combined)


# ---------------------------------------------------------------------------- summaries and checks
def _iv(iv: Interval) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in iv.to_dict().items()}


def _mean(x: np.ndarray) -> float:
    return round(float(np.mean(x)), 6)


def summarize_pass(scores: PassScores, cfg: EvalConfig, models: EvalModels, guidance: float,
                   gate: bool) -> dict[str, Any]:
    """One pass's figures: ``conditions`` (per condition: controlled means, uncontrolled primary,
    gain interval), ``combined`` (per combined condition: gain and gain-ratio intervals),
    ``uncontrolled`` (image metrics) and ``quality_bar`` (``gates``: whether this pass decides)."""
    boot: dict[str, Any] = {"n_boot": cfg.n_boot, "seed": cfg.bootstrap_seed, "level": LEVEL}
    n = len(scores.image[UNCONTROLLED]["image_psnr"])
    gains = {}
    conditions: dict[str, dict[str, Any]] = {}
    for c in cfg.conditions:
        ctrl, unc = scores.primary(c, c), scores.primary(UNCONTROLLED, c)
        gains[c] = bootstrap_diff(ctrl, unc, **boot)
        entry = {"fidelity": _mean(ctrl), "metric": PRIMARY_METRIC[c], "uncontrolled": _mean(unc),
                 "weight": cfg.weight(c),
                 "gain": _iv(gains[c]), **means(scores.fidelity[c][c]), **means(scores.image[c]),
                 "n_scans": len(ctrl), "guidance": float(guidance)}
        if c in models.adapter_params:
            entry["adapter_params"] = int(models.adapter_params[c])
        conditions[c] = entry
    ratios = {}
    combined: dict[str, Any] = {"weights": {c: float(w) for c, w in cfg.combined.items()}}
    for c in cfg.combined:
        comb, (single, unc) = scores.primary(COMBINED, c), scores.on_combined[c]
        ratios[c] = bootstrap_gain_ratio(comb, single, unc, **boot)
        combined[c] = {"fidelity": _mean(comb), "gain": _iv(bootstrap_diff(comb, unc, **boot)),
                       "single_gain": conditions[c]["gain"]["value"], "ratio": _iv(ratios[c])}
    if cfg.combined:
        combined.update(means(scores.image[COMBINED]), n_scans=len(scores.image[COMBINED]["image_psnr"]))
    bar = quality_bar(gains, ratios, models.adapter_params, models.controlnet_params, conditions=cfg.conditions,
                      combined=list(cfg.combined), new_conditions=cfg.new_conditions)
    return {"guidance": float(guidance), "n_scans": n, "conditions": conditions, "combined": combined,
            "uncontrolled": {**means(scores.image[UNCONTROLLED]), "n_scans": n},
            "quality_bar": {"guidance": float(guidance), "gates": gate, "level": LEVEL, **bar}}


# ---------------------------------------------------------------------------- grids
def save_pass_grids(images: Mapping[str, np.ndarray], test: EvalData | TestSplit, cfg: EvalConfig, out: Path,
                    rows: Mapping[str, np.ndarray] | None = None) -> None:
    """``<c>.png`` (condition | generated | no control | ground truth) on the first scans that have
    c, ``uncontrolled.png`` and ``combined.png`` (each combined condition, each alone, the
    combination, ground truth) on the first scans that have all of its conditions."""
    split = _split(test)
    rows = pass_rows(cfg, split, len(split)) if rows is None else rows

    def grid(name: str, model: str, cols: list[list[np.ndarray]], titles: list[str]) -> None:
        k = min(cfg.grid_rows, len(rows[model]))
        save_grid([[col[i] for col in cols] for i in range(k)], out / f"{name}.png", titles=titles)

    def show(model: str, on: str) -> list[np.ndarray]:
        """The images of ``model`` on the first grid scans of ``on``."""
        r = rows[on][: cfg.grid_rows]
        return list(images[model][_positions(r, rows[model])])

    def view(on: str) -> EvalData:
        return _take(split.data, rows[on][: cfg.grid_rows])

    for c in cfg.conditions:
        v = view(c)
        grid(c, c, [[condition_cell(c, v, i) for i in range(len(v))], show(c, c), show(UNCONTROLLED, c), list(v.photos)],
             [c, "generated", "no control", "ground truth"])
    grid(UNCONTROLLED, UNCONTROLLED, [show(UNCONTROLLED, UNCONTROLLED), list(view(UNCONTROLLED).photos)],
         ["no control", "ground truth"])
    if cfg.combined:
        names, v = list(cfg.combined), view(COMBINED)
        grid(COMBINED, COMBINED, [*[[condition_cell(c, v, i) for i in range(len(v))] for c in names],
                                  *[show(c, COMBINED) for c in names], show(COMBINED, COMBINED), list(v.photos)],
             [*names, *[f"{c} only" for c in names], "combined", "ground truth"])


def per_scan_rows(scores: PassScores, guidance: float) -> list[str]:
    """CSV rows ``guidance,model,condition,scan_id,fidelity`` (primary metric per scan)."""
    rows = []
    for model, by_cond in scores.fidelity.items():
        for c in by_cond:
            ids = scores.scan_ids[COMBINED if model == COMBINED else c]
            rows += [f"{guidance_key(guidance)},{model},{c},{sid},{v:.6f}"
                     for sid, v in zip(ids, scores.primary(model, c))]
    return rows


# ---------------------------------------------------------------------------- the run
def run_evaluation(models: EvalModels, test: EvalData | TestSplit, detectors: Mapping[str, Any], cfg: EvalConfig,
                   reports_dir: str | Path | None = None, progress: bool = True,
                   log: Callable[[str], None] = print, runner: JobRunner | None = None) -> dict[str, Any]:
    """Generate, score and check every guidance pass (the gate first, on every scan); returns the
    ``metrics/evaluate.json`` dict and, with ``reports_dir``, writes the grids (the gate's at the
    top, other scales' under ``guidance_<g>/``) and ``per_scan.csv`` there. ``runner`` generates
    the jobs of :func:`generation_jobs` (e.g. over several processes that load the same models
    and scans); by default this process does, with ``models``, on the GPU when there is one.
    ``test``: a :class:`TestSplit` (each condition scored on the scans that have it) or an
    :class:`EvalData` whose every scan has every condition."""
    from ctrlora.device import default_device
    from ctrlora.sampling import CtrLoRAPipeline

    missing = [c for c in cfg.new_conditions if c not in models.adapter_params]
    if missing:
        raise ValueError(f"no adapter sizes for new conditions {missing}")
    split = _split(test)
    if cfg.combined and not split.rows(list(cfg.combined), len(split)).size:
        raise ValueError(f"no test scan has every condition of the combination {list(cfg.combined)}")
    jobs = generation_jobs(cfg, split)
    t = time.perf_counter()
    if runner is None:
        # the models move with the pipeline (the seeds' noise is drawn on the CPU either way)
        pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet).to(default_device())
        pipe.set_progress_bar_config(disable=True)
        made = [run_job(pipe, split, job, cfg.sampling, progress) for job in jobs]
    else:
        made = runner(jobs)
    if len(made) != len(jobs):
        raise RuntimeError(f"the generation runner returned {len(made)} results for {len(jobs)} jobs")
    by_job = {(job.guidance, job.model): im for job, im in zip(jobs, made)}
    reports = Path(reports_dir) if reports_dir else None
    timing = {"generate": round(time.perf_counter() - t, 1)}
    passes, csv = {}, ["guidance,model,condition,scan_id,fidelity"]
    for g, n in cfg.passes(len(split)):
        rows, gate, key = pass_rows(cfg, split, n), g == cfg.gate_guidance, guidance_key(g)
        images = {model: by_job[(g, model)] for model in pass_controls(cfg)}
        t = time.perf_counter()
        scores = score_pass(images, split, detectors, cfg, rows)
        passes[key] = summarize_pass(scores, cfg, models, g, gate)
        timing[f"score_{key}"] = round(time.perf_counter() - t, 1)
        _log_pass(passes[key], log)
        csv += per_scan_rows(scores, g)
        if reports is not None:
            save_pass_grids(images, split, cfg, reports if gate else reports / f"guidance_{key}", rows)
    if reports is not None:
        reports.mkdir(parents=True, exist_ok=True)
        (reports / "per_scan.csv").write_text("\n".join(csv) + "\n")
    return _assemble(passes, cfg, models, split.data, timing)


def _log_pass(p: Mapping[str, Any], log: Callable[[str], None]) -> None:
    for c, e in p["conditions"].items():
        gn = e["gain"]
        log(f"[evaluate] g={p['guidance']:g} {c}: {e['metric']} {e['fidelity']:.4f} vs {e['uncontrolled']:.4f} "
            f"uncontrolled, gain {gn['value']:+.4f} [{gn['low']:+.4f}, {gn['high']:+.4f}] (n={gn['n']})")


def _assemble(passes: Mapping[str, dict], cfg: EvalConfig, models: EvalModels, test: EvalData,
              timing: Mapping[str, float]) -> dict[str, Any]:
    gate = passes[guidance_key(cfg.gate_guidance)]
    n_cn = models.controlnet_params
    fractions = {c: round(v / n_cn, 6) for c, v in models.adapter_params.items()} if n_cn else {}
    return {
        **gate["conditions"],
        "combined": gate["combined"],
        "uncontrolled": gate["uncontrolled"],
        "quality_bar": gate["quality_bar"],
        "at_guidance": {k: p for k, p in passes.items() if p is not gate},
        "params": {"controlnet": n_cn, "adapters": dict(models.adapter_params),
                   "adapter_fraction": fractions},
        "protocol": {
            "split": "test", "n_scans": len(test),
            "scan_ids_sha256": hashlib.sha256("\n".join(test.scan_ids).encode()).hexdigest()[:16],
            "conditions": cfg.conditions, "new_conditions": list(cfg.new_conditions),
            "guidance": list(cfg.guidance), "gate_guidance": cfg.gate_guidance,
            "condition_weights": {c: cfg.weight(c) for c in cfg.conditions},
            "scans_per_guidance": {k: p["n_scans"] for k, p in passes.items()},
            "sampling": {"steps": cfg.sampling.steps, "scheduler": cfg.sampling.scheduler,
                         "seed": cfg.sampling.seed, "seed_rule": "scan i gets seed + i"},
            "bootstrap": {"method": "paired percentile", "unit": "scan", "n_boot": cfg.n_boot,
                          "seed": cfg.bootstrap_seed, "level": LEVEL},
            "train_seeds": 1,
        },
        "timing_seconds": dict(timing),
    }


def json_ready(x: Any) -> Any:
    """Numbers → plain floats / ints (NaN, ±inf → None), for ``json.dumps``."""
    if isinstance(x, Mapping):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x
