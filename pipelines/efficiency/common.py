"""Shared shell of the data-efficiency graph (``efficiency/dvc.yaml``): its params, the runs it
trains and where each lives, the learning-rate map over K, and what a worker loads once.

The question: does a trained Base ControlNet let a *new* condition learn from few pairs? Every
run learns one new condition (``efficiency.conditions``) from K training pairs
(``efficiency.k``) with one method (``efficiency.methods``, from
:data:`ctrlora.training.baselines.METHODS`) and the production adapter's recipe (``train_adapter``:
steps, batch, rank, prompt dropout, seed), except that K replaces ``train_adapter.max_pairs``.

Which pairs: the trainer keeps the first K of a permutation of the condition's training pairs
seeded by the run's training seed (``train_adapter.train.seed + seed``). So for one seed the
subsets are nested (30 ⊂ 100 ⊂ 300 ⊂ 1000) and every method sees the same pairs (the comparison
is paired); another seed draws another subset. The seed interval therefore covers which K pairs
a team happens to have, as well as initialisation and batches.

Learning rates (:func:`nearest_tuned_k`): every method's rates are swept with seed 0 at each K of
``efficiency.tune_k`` on the validation split; every K of the curve uses the choice made at the
tuned K nearest to it in log K (a tie goes to the smaller tuned K).

Runs: seed 0 at a tuned K lives under ``<paths.efficiency>/sweep/<condition>/k<K>/<method>/lr_<rate>/seed_0``
(the sweep trained it); every other run under ``<paths.efficiency>/runs/...`` with the same tail.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pipelines  # noqa: F401  (tool defaults)

from pipelines.research.common import MIN_RATES, path  # the research graph's sweep rule and path lookup
from pipelines.stages.common import artefact_paths, read_params, resolve_backbone
from pipelines.workers import log, read_json, write_json  # noqa: F401  (the stages read them from here)
from pipelines.workers import pool_map as workers_pool_map

__all__ = ["params", "path", "Run", "recipe", "nearest_tuned_k", "in_sweep", "run_dir", "all_runs", "selected_rates",
           "check_pairs", "ctx", "pool_map", "log", "read_json", "write_json"]

_CTX: dict[str, Any] = {}  # what a worker loaded once (setup)
# params efficiency: every key stated there (none missing, none unknown)
KEYS = ("conditions", "methods", "k", "headline_k", "tune_k", "learning_rates", "seeds", "validation_scans", "n_boot",
        "bootstrap_seed", "workers", "threads")


def params() -> dict[str, Any]:
    """``efficiency`` params, checked, with ``recipe`` (= ``train_adapter``), from ``evaluate``
    ``test_scans`` and ``sampling`` (at the gate guidance), and ``paths`` (resolved) added; ``k``,
    ``tune_k`` and ``headline_k`` come back as sorted lists of ints."""
    from ctrlora.params import checked_section
    from ctrlora.training.baselines import METHODS

    allp = read_params("efficiency", "train_adapter", "evaluate")
    p, rec, ev = checked_section("efficiency", allp["efficiency"], KEYS), allp["train_adapter"], allp["evaluate"]
    conds = list(p["conditions"])
    if not conds or len(set(conds)) != len(conds):
        raise SystemExit(f"efficiency.conditions must be distinct and not empty, got {conds}")
    bad = [c for c in conds if c not in rec["conditions"]]
    if bad:  # the embed cache holds the new conditions of train_adapter
        raise SystemExit(f"efficiency.conditions {bad} are not train_adapter.conditions {rec['conditions']}")
    methods = list(p["methods"])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"efficiency.methods: unknown {unknown}; known: {list(METHODS)}")
    cnn = [m for m in methods if METHODS[m].embedding != "vae"]
    if cnn:  # the hint CNN reads condition images, which this graph does not load
        raise SystemExit(f"efficiency.methods: {cnn} read the condition image (hint CNN); not supported here")
    if "adapter" not in methods:
        raise SystemExit("efficiency.methods must include `adapter`: every difference is read against it")
    few = {m: p["learning_rates"].get(m) for m in methods if len(p["learning_rates"].get(m) or []) < MIN_RATES}
    if few:
        raise SystemExit(f"efficiency.learning_rates: every method needs at least {MIN_RATES} rates, got {few}")
    ks = [int(k) for k in p["k"]]
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise SystemExit(f"efficiency.k must be distinct positive pair counts, got {p['k']}")
    for key in ("tune_k", "headline_k"):
        vals = [int(k) for k in p[key] or []]
        if key == "tune_k" and not vals:
            raise SystemExit("efficiency.tune_k: at least one K to tune the learning rates at")
        if [k for k in vals if k not in ks]:
            raise SystemExit(f"efficiency.{key} {vals}: every value must be one of efficiency.k {ks}")
        p[key] = sorted(set(vals))
    if int(p["seeds"]) < 1:
        raise SystemExit("efficiency.seeds must be >= 1")
    sampling = dict(ev["sampling"])
    sampling["guidance_scale"] = float(ev["gate_guidance"])  # the guidance scale the production bar is read at
    p.update(conditions=conds, methods=methods, k=sorted(ks), seeds=int(p["seeds"]), recipe=rec,
             test_scans=ev["max_scans"], sampling=sampling, paths=artefact_paths())
    return p


@dataclass(frozen=True)
class Run:
    """One training run: ``method`` learns ``condition`` from ``k`` pairs at ``learning_rate``,
    seed index ``seed`` (0, 1, ...)."""

    condition: str
    k: int
    method: str
    learning_rate: float
    seed: int

    @property
    def spec(self):
        from ctrlora.training.baselines import RunSpec

        return RunSpec(self.method, float(self.learning_rate), int(self.seed))

    @property
    def key(self) -> str:
        return f"{self.condition}/k{self.k}/{self.spec.key}"


def recipe(p: dict[str, Any], k: int):
    """``train_adapter``'s recipe with K training pairs in place of its ``max_pairs``."""
    from ctrlora.training.baselines import Recipe

    return dataclasses.replace(Recipe.from_params(p["recipe"]), max_pairs=int(k))


def nearest_tuned_k(k: int, tune_k: Sequence[int]) -> int:
    """The tuned K closest to ``k`` in log K (a tie goes to the smaller tuned K)."""
    if not tune_k:
        raise ValueError("no tuned K")
    return min((int(t) for t in tune_k), key=lambda t: (round(abs(math.log(k) - math.log(t)), 12), t))


def in_sweep(p: dict[str, Any], run: Run) -> bool:
    """Seed 0 at a tuned K was trained by the sweep (the chosen rate is one of the swept ones)."""
    return run.seed == 0 and run.k in p["tune_k"]


def run_dir(p: dict[str, Any], run: Run) -> Path:
    return path(p, "efficiency") / ("sweep" if in_sweep(p, run) else "runs") / run.key


def all_runs(p: dict[str, Any], rates: dict[str, dict[str, dict[str, Any]]]) -> list[Run]:
    """Every run of the curve: condition x K x method x seed, at the rate ``rates[c][str(k)][m]``
    (the selection record's ``rates``)."""
    return [Run(c, k, m, float(rates[c][str(k)][m]["learning_rate"]), s)
            for c in p["conditions"] for k in p["k"] for m in p["methods"] for s in range(p["seeds"])]


def selected_rates(p: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{condition: {str(K): {method: {learning_rate, tuned_at_k, at_edge}}}}`` from ``select``."""
    file = path(p, "metrics", "efficiency_selection")
    rates = read_json(file)["rates"]
    missing = [(c, k, m) for c in p["conditions"] for k in p["k"] for m in p["methods"]
               if m not in rates.get(c, {}).get(str(k), {})]
    if missing:
        raise SystemExit(f"{file}: no selected rate for {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                         "rerun `select`")
    return rates


def check_pairs(p: dict[str, Any], ks: Sequence[int]) -> dict[str, int]:
    """Training pairs per condition in the embed cache; refuses a K above them (the trainer would
    silently use them all, and the point would not be at K)."""
    from ctrlora.training.embed import load_embed_cache

    cache = load_embed_cache(path(p, "embed"), list(p["conditions"]))
    have = {c: int(len(cache.pair_rows(c, "train"))) for c in p["conditions"]}
    short = {c: n for c, n in have.items() if n < max(ks)}
    if short:
        raise SystemExit(f"efficiency: K up to {max(ks)} but only {short} training pairs in {path(p, 'embed')}")
    return have


# ---------------------------------------------------------------------------- what workers load
def setup(needs: Sequence[str], threads: int) -> None:
    """Load, once per process, what the jobs need: ``backbone``, ``cache`` (every condition),
    ``validation`` / ``test`` scans per condition, ``detectors`` per condition."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    p = _CTX["p"] = params()
    conds = p["conditions"]
    if "backbone" in needs:
        from ctrlora.models.backbone import load_backbone

        _CTX["backbone"] = load_backbone(resolve_backbone(path(p, "backbone")))
    if "cache" in needs:
        from ctrlora.training.embed import load_embed_cache

        _CTX["cache"] = load_embed_cache(path(p, "embed"), conds)
    for split, n in (("validation", p["validation_scans"]), ("test", p["test_scans"])):
        if split in needs:
            from ctrlora.evaluation.loading import load_split

            # one condition at a time: each condition's scans are the ones research / evaluate use for it
            _CTX[split] = {c: load_split(path(p, "prepared"), split, [c], max_scans=n, progress=False) for c in conds}
    if "detectors" in needs:
        _CTX["detectors"] = load_detectors(p)


def load_detectors(p: dict[str, Any]) -> dict[str, Any]:
    """The production evaluation's re-detectors of the conditions (read only; never retrained here).
    A condition scored by code (no detector) is simply absent."""
    from ctrlora.evaluation.detectors import load_detector
    from ctrlora.evaluation.fidelity import DETECTED_CONDITIONS

    out = {}
    for c in p["conditions"]:
        if c not in DETECTED_CONDITIONS:
            continue
        d = path(p, "detectors") / c
        if not d.is_dir():
            raise SystemExit(f"{d}: no re-detector for {c!r}; run the production graph (`make repro`) first")
        out[c] = load_detector(d)
    return out


def ctx(key: str) -> Any:
    return _CTX[key]


def pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], needs: Sequence[str], workers: int,
             threads: int) -> list[Any]:
    """:func:`pipelines.workers.pool_map` with this graph's :func:`setup`."""
    return workers_pool_map(fn, jobs, needs, workers, threads, setup)
