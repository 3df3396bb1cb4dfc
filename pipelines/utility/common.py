"""Shared shell of the utility graph (``utility/dvc.yaml``): its params, which scans each run sees,
where runs live, and what a worker process loads once.

Scans (training split, those with a segmentation label map):

* the **pool**: the first ``utility.pool`` scans of a permutation seeded by ``subset_seed``. Only
  their masks (label maps) and captions are used: the ``generate`` stage draws one photograph
  per mask with the production segmentation adapter (and one without control, same caption and
  sampling seed). Pool photographs are never given to a segmenter.
* the **real subsets**: for training seed ``s``, a permutation of the remaining training scans
  seeded by ``(subset_seed, s)``; a run with N real photographs takes its first N, so within a
  seed the subsets are nested (25 ⊂ 50 ⊂ …) and across seeds they differ: the seed interval covers
  which photographs a team happens to have annotated.

Runs: ``<paths.utility>/{sweep,seeds}/<key>/seed_<s>`` (weights + per-scan scores), key
``n<N>/<arm>`` or ``n<N>/<arm>_m<M>`` with M generated images. Splits: train (segmenters and the
pool), validation (chooses M per N and arm), test (read only by ``evaluate`` and ``audit``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import pipelines  # noqa: F401  (tool defaults)

from pipelines.workers import log, read_json, write_json  # noqa: F401  (the stages read them from here)
from pipelines.stages.common import artefact_paths, read_params, resolve_backbone

ARMS = ("real", "real_aug", "real_gen", "real_gen_uncontrolled", "real_aug_gen")
# arm -> the pool it draws generated images from; arms trained with classic augmentation
GENERATED_ARMS = {"real_gen": "controlled", "real_gen_uncontrolled": "uncontrolled", "real_aug_gen": "controlled"}
AUGMENTED_ARMS = frozenset({"real_aug", "real_aug_gen"})
# params utility: every key stated there (none missing, none unknown)
KEYS = ("condition", "n_real", "curve_extra", "headline_n", "arms", "pool", "m_grid", "generation_seed", "subset_seed",
        "seeds", "validation_scans", "test_scans", "segmenter", "audit", "n_boot", "bootstrap_seed", "workers", "threads")
AUDIT_KEYS = ("percentile", "grid_pairs")
RUN_SEGMENTER_KEYS = ("augment", "seed")  # SegmenterConfig settings each run sets (its arm, its seed), not params
_CTX: dict[str, Any] = {}


def params() -> dict[str, Any]:
    """``utility`` params, checked, with ``sampling`` and the condition's residual ``weight``
    (the production evaluation's recipe) and ``paths`` (resolved) added."""
    from dataclasses import fields

    from ctrlora.downstream.segmenter import SegmenterConfig
    from ctrlora.params import checked_section

    allp = read_params("utility", "evaluate")
    p, ev = checked_section("utility", allp["utility"], KEYS), allp["evaluate"]
    checked_section("utility.audit", p["audit"], AUDIT_KEYS)
    checked_section("utility.segmenter", p["segmenter"],
                    [f.name for f in fields(SegmenterConfig) if f.name not in RUN_SEGMENTER_KEYS])
    bad = [a for a in p["arms"] if a not in ARMS]
    if bad:
        raise SystemExit(f"utility.arms: unknown {bad}; known: {list(ARMS)}")
    if "real" not in p["arms"]:
        raise SystemExit("utility.arms must include `real`: every gain is read against real-only training")
    if p["headline_n"] not in p["n_real"]:
        raise SystemExit(f"utility.headline_n {p['headline_n']} is not one of utility.n_real {p['n_real']}")
    if int(p["seeds"]) < 1:
        raise SystemExit("utility.seeds must be >= 1")
    if any(m > p["pool"] for m in p["m_grid"]):
        raise SystemExit(f"utility.m_grid {p['m_grid']}: no M may exceed utility.pool ({p['pool']})")
    sampling = dict(ev["sampling"])
    sampling["guidance_scale"] = float(ev["gate_guidance"])
    p.update(sampling=sampling, weight=float(ev["condition_weights"][p["condition"]]), paths=artefact_paths())
    return p


def curve_n(p: dict[str, Any]) -> list[int]:
    """Every N with a real-only run: the arms' N and the extra points of the real-only curve."""
    return sorted({int(n) for n in p["n_real"]} | {int(n) for n in p["curve_extra"] or []})


@dataclass(frozen=True)
class Run:
    """One segmenter training: ``n`` real photographs, an arm, ``m`` generated images, a seed."""

    n: int
    arm: str
    m: int
    seed: int

    @property
    def key(self) -> str:
        return f"n{self.n}/{self.arm}" + (f"_m{self.m}" if self.arm in GENERATED_ARMS else "")

    def dir(self, p: dict[str, Any]) -> Path:
        return p["paths"]["utility"] / ("sweep" if self.seed == 0 else "seeds") / self.key / f"seed_{self.seed}"


def sweep_runs(p: dict[str, Any]) -> list[Run]:
    """Seed 0 of every configuration the validation split chooses among (and the real-only curve)."""
    runs = []
    for n in curve_n(p):
        runs.append(Run(n, "real", 0, 0))
        if n not in p["n_real"]:
            continue
        if "real_aug" in p["arms"]:
            runs.append(Run(n, "real_aug", 0, 0))
        for arm in GENERATED_ARMS:
            if arm in p["arms"]:
                runs += [Run(n, arm, int(m), 0) for m in p["m_grid"]]
    return runs


def chosen_runs(p: dict[str, Any], selection: dict[str, Any], seeds: Sequence[int]) -> list[Run]:
    """The selected configuration of every (N, arm) at each of ``seeds``."""
    out = []
    for n in curve_n(p):
        for arm in p["arms"]:
            if arm != "real" and n not in p["n_real"]:
                continue
            m = int(selection["chosen"][str(n)].get(arm, {}).get("m", 0)) if arm in GENERATED_ARMS else 0
            out += [Run(n, arm, m, s) for s in seeds]
    return out


# ---------------------------------------------------------------------------- scans
def _permutation(ids: Sequence[str], seed: Any) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in order]


def pool_ids(p: dict[str, Any], train_ids: Sequence[str]) -> list[str]:
    need = int(p["pool"]) + max(curve_n(p))
    if len(train_ids) < need:
        raise SystemExit(f"utility: {len(train_ids)} training scans with label maps; the pool ({p['pool']}) and "
                         f"the largest real subset ({max(curve_n(p))}) need {need}: lower utility.pool or the N")
    return _permutation(sorted(train_ids), int(p["subset_seed"]))[: int(p["pool"])]


def real_ids(p: dict[str, Any], train_ids: Sequence[str], n: int, seed: int) -> list[str]:
    pool = set(pool_ids(p, train_ids))
    rest = sorted(i for i in train_ids if i not in pool)
    return _permutation(rest, [int(p["subset_seed"]), int(seed)])[: int(n)]


def load(p: dict[str, Any], split: str, max_scans: int | None = None):
    """The split's scans that have a segmentation label map (photos, masks as label ids, captions)."""
    from ctrlora.evaluation.loading import load_split

    paths = p["paths"]
    return load_split(paths["prepared"], split, [p["condition"]], [paths["rendered"], paths["scans"]],
                      max_scans=max_scans, progress=False)


def pool_file(p: dict[str, Any]) -> Path:
    return p["paths"]["utility_data"] / "pool.npz"


def read_pool(p: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(pool_file(p), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------- workers
def setup(needs: Sequence[str], threads: int) -> None:
    """Load once per process: ``train`` (with the index of each scan id), ``validation``, ``test``,
    ``pool`` (generated images and their masks)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    p = _CTX["p"] = params()
    for split, n in (("train", None), ("validation", p["validation_scans"]), ("test", p["test_scans"])):
        if split in needs:
            data = _CTX[split] = load(p, split, n)
            if split == "train":
                _CTX["train_index"] = {sid: i for i, sid in enumerate(data.scan_ids)}
    if "pool" in needs:
        _CTX["pool"] = read_pool(p)


def ctx(key: str) -> Any:
    return _CTX[key]


def backbone_dir(p: dict[str, Any]) -> Path:
    return resolve_backbone(p["paths"]["backbone"])
