"""Shared shell of the research stages (``research/dvc.yaml``): their params, where each run
lives, and a small process pool.

Params: the ``research`` section, the recipe of ``train_adapter`` (every method trains with it)
and, from ``evaluate``, the test-scan count and the sampling settings at the gate guidance: the
comparisons use the production evaluation's scans, per-scan seeds, guidance and re-detectors
(``paths.detectors``). Every folder and file comes from ``paths`` (:func:`path`).

Runs: seed 0 of every swept rate lives under ``<paths.research>/sweep/<method>/lr_<rate>/seed_0``;
the further seeds at the selected rate under ``<paths.research>/seeds/<method>/lr_<rate>/seed_<k>``.

The pool: the research graph trains ~two dozen short runs; on a small CPU two single-threaded
processes get more done than one process with two threads. Each worker loads what its jobs need
once (:func:`setup`), then runs jobs; results come back in job order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pipelines  # noqa: F401  (tool defaults)

from pipelines.stages.common import artefact_paths, read_params, resolve_backbone
from pipelines.workers import log, read_json, write_json  # noqa: F401  (the stages read them from here)
from pipelines.workers import pool_map as workers_pool_map

MIN_RATES = 3  # a learning-rate sweep of fewer rates cannot tell an optimum from an edge
# params research: every key stated there (none missing, none unknown)
KEYS = ("condition", "methods", "learning_rates", "seeds", "snapshot_every", "validation_scans", "ablation_scans",
        "n_boot", "bootstrap_seed", "workers", "threads")
_CTX: dict[str, Any] = {}  # what a worker loaded once (setup)


def params() -> dict[str, Any]:
    """``research`` params, checked, with ``recipe`` (= ``train_adapter``), from ``evaluate``
    ``test_scans`` and ``sampling`` (at the gate guidance), and ``paths`` (resolved) added."""
    from ctrlora.params import checked_section
    from ctrlora.training.baselines import METHODS

    allp = read_params("research", "train_adapter", "evaluate")
    p, recipe, ev = checked_section("research", allp["research"], KEYS), allp["train_adapter"], allp["evaluate"]
    if p["condition"] not in recipe["conditions"]:
        raise SystemExit(f"research.condition {p['condition']!r} is not one of train_adapter.conditions "
                         f"{recipe['conditions']}")
    unknown = [m for m in p["methods"] if m not in METHODS]
    if unknown:
        raise SystemExit(f"research.methods: unknown {unknown}; known: {list(METHODS)}")
    few = {m: p["learning_rates"].get(m) for m in p["methods"] if len(p["learning_rates"].get(m) or []) < MIN_RATES}
    if few:
        raise SystemExit(f"research.learning_rates: every method needs at least {MIN_RATES} rates, got {few}")
    if int(p["seeds"]) < 1:
        raise SystemExit("research.seeds must be >= 1")
    sampling = dict(ev["sampling"])
    sampling["guidance_scale"] = float(ev["gate_guidance"])  # the guidance scale the production bar is read at
    p.update(recipe=recipe, test_scans=ev["max_scans"], sampling=sampling, paths=artefact_paths())
    return p


def path(p: dict[str, Any], *keys: str) -> Path:
    """``paths`` entry by key, e.g. ``path(p, "metrics", "research")``."""
    node = p["paths"]
    for key in keys:
        node = node[key]
    return node


def run_dir(p: dict[str, Any], spec) -> Path:
    """Where run ``spec`` (a :class:`~ctrlora.training.baselines.RunSpec`) is written."""
    return path(p, "research") / ("sweep" if spec.seed == 0 else "seeds") / spec.key


# ---------------------------------------------------------------------------- what workers load
def setup(needs: Sequence[str], threads: int) -> None:
    """Load, once per process, what the jobs need: ``backbone``, ``cache`` (+ the condition images
    when a hint-CNN method runs), ``validation`` / ``test`` scans, ``detectors``."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    p = _CTX["p"] = params()
    c = p["condition"]
    if "backbone" in needs:
        from ctrlora.models.backbone import load_backbone

        _CTX["backbone"] = load_backbone(resolve_backbone(path(p, "backbone")))
    if "cache" in needs:
        from ctrlora.training.baselines import METHODS, condition_images_for_cache
        from ctrlora.training.embed import load_embed_cache

        _CTX["cache"] = cache = load_embed_cache(path(p, "embed"), [c])
        if any(METHODS[m].embedding == "cnn" for m in p["methods"]):
            _CTX["images"] = condition_images_for_cache(path(p, "prepared"), cache, c)
    for split, n in (("validation", p["validation_scans"]), ("test", p["test_scans"])):
        if split in needs:
            from ctrlora.evaluation.loading import load_split

            _CTX[split] = load_split(path(p, "prepared"), split, [c], max_scans=n, progress=False)
    if "detectors" in needs:
        _CTX["detectors"] = load_detectors(p)


def load_detectors(p: dict[str, Any]) -> dict[str, Any]:
    """The production evaluation's re-detector of the condition (read only; never retrained here)."""
    from ctrlora.evaluation.detectors import load_detector
    from ctrlora.evaluation.fidelity import DETECTED_CONDITIONS

    c = p["condition"]
    if c not in DETECTED_CONDITIONS:
        return {}
    d = path(p, "detectors") / c
    if not d.is_dir():
        raise SystemExit(f"{d}: no re-detector for {c!r}; run the production graph (`make repro`) first")
    return {c: load_detector(d)}


def ctx(key: str) -> Any:
    return _CTX[key]


def pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], needs: Sequence[str], workers: int,
             threads: int) -> list[Any]:
    """:func:`pipelines.workers.pool_map` with this graph's :func:`setup`."""
    return workers_pool_map(fn, jobs, needs, workers, threads, setup)
