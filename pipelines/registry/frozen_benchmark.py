"""The frozen benchmark that decides promotions, and the gate that scores on it.

A benchmark version fixes, for each condition, a list of held-out validation scans that have that
condition, the re-detectors that score them, the sampling (steps, scheduler, guidance, first seed:
scan ``i`` of a condition's list gets ``seed + i``) and the bootstrap (resamples, seed). It changes
only through an explicit command, which writes a new version:

    ctrlora-ops benchmark freeze            # v1 from the current validation split and re-detectors
    ctrlora-ops benchmark bump --reason ... # v<N+1>; the earlier manifests stay
    ctrlora-ops benchmark show [--json]     # the current version, its scans, whether it verifies

(also ``python -m pipelines.registry.frozen_benchmark ...``). Where things lie (params.yaml ``paths``):

* ``paths.benchmark`` (``frozen_benchmark/``, committed): ``v<N>.json``, the manifest -- each
  condition's scan ids (``condition_scans``; ``scan_ids`` is their union), the conditions left out
  and why (``refused``), the pairs rows (captions), the sha256 of every frozen file, sampling and
  bootstrap settings. A manifest without ``condition_scans`` (written before lists were kept per
  condition) holds one list, ``scan_ids``, for every condition, and is read and compared as it was.
* ``paths.benchmark_store`` (``data/frozen_benchmark/``, not in git): ``v<N>/`` the frozen files --
  ``prepared/`` (photos and condition images in the prepared layout), ``labels/<id>/
  segmentation.png`` (raw label maps) and ``detectors/<c>/`` (the re-detectors).

When the store lacks a file (a fresh clone), it is copied back from where the manifest says it
came from, but only when its sha256 matches; any other difference is an error naming the file.
New scans never enter a version: its scan list is in the manifest. The scans are validation scans
when frozen and are checked against the workspace's current split before every use (a benchmark
scan now in train is an error: never trained on).

Which scans: for each condition of ``train_base`` + ``train_adapter``, the first ``max_scans``
validation scans (scan-id order) that have it, so a clinic scan (never a lighting map, maybe only a
mask) is in the benchmark of the conditions it has, and a deployment of clinic scans alone gets a
benchmark at all. A condition with fewer than two such scans (:data:`MIN_SCANS`: a paired interval
needs scans) is left out of the version, named in the log and in the manifest's ``refused``; its
comparisons fail with that reason (the champion stays) until a ``bump`` finds its scans. Only when
every condition is left out is freezing refused.

Why validation: promotion is model selection, and every other choice of the project (rates, steps,
weights) is made on the validation split; the test split stays the one the report is made on,
read by ``evaluate`` alone. Champion and challenger are scored on the same scans with the same
seeds, so choices tuned on validation favour neither side of the paired difference.

A deployment freezes its own v1: when registration finds no manifest (a fresh clone, a new
deployment), :func:`gate_for` freezes v1 from that workspace's validation split and the committed
re-detectors, so the first retrain is already compared with its champion. Commit the manifest; a
deployment on several machines also keeps the store (``paths.benchmark_store``) where every
machine gets it (DVC-track it and push it to the deployment's remote), since files rebuilt on
another CPU may differ in their bytes (docs/mlops.md).

:class:`BenchmarkGate` is the judge :func:`pipelines.registry.registration.register_adapter` calls: it
generates the champion's and the challenger's images on the benchmark scans with the same seeds
(the evaluation's own generation of one pass, ``ctrlora.evaluation.run.run_job``), scores both
with the frozen re-detectors (``per_scan_fidelity``), takes the paired bootstrap of the per-scan
differences (``bootstrap_diff``) and decides with :func:`pipelines.registry.gate.paired_decision`.
Both sides are sampled at one residual weight: the challenger's recipe weight
(:func:`pipelines.registry.gate.comparison_weight`), the weight the alias serves if it moves. The
weight belongs to the version under test, not to the benchmark: a manifest fixes the scans,
re-detectors, sampler, seeds and bootstrap, and every comparison records the weight it sampled
at (``gate_weight``).

Params (``register.benchmark``, every key required: :data:`BENCHMARK_KEYS`): ``max_scans`` (scans
in a new version), ``sampling``, ``bootstrap``, ``grid_rows``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ctrlora.data.files import sha256_file

# What params.yaml ``register.benchmark`` must state (the values are stated there only).
BENCHMARK_KEYS = ("max_scans", "sampling.steps", "sampling.scheduler", "sampling.guidance_scale",
                  "sampling.batch_size", "sampling.seed", "bootstrap.n_boot", "bootstrap.seed", "grid_rows")
LEVEL = 0.95
SPLIT = "validation"   # promotion is model selection: never the test split
MIN_SCANS = 2          # per condition: a paired interval of one scan says nothing
LABEL_FILE = "segmentation.png"


class BenchmarkError(RuntimeError):
    """The benchmark cannot be frozen, found or trusted; the message names the file and rule."""


# ---------------------------------------------------------------------------- params and places
def benchmark_params(root: Path) -> dict[str, Any]:
    """params.yaml ``register.benchmark``, every key of :data:`BENCHMARK_KEYS` present (a missing
    one is an error naming it: params.yaml is the one statement of these settings)."""
    from pipelines.settings import load_params

    source = Path(root) / "params.yaml"
    section = (load_params(root).get("register") or {}).get("benchmark")
    if not isinstance(section, Mapping):
        raise BenchmarkError(f"{source}: register.benchmark is missing (the settings of a new benchmark version)")
    for key in BENCHMARK_KEYS:
        node: Any = section
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise BenchmarkError(f"{source}: register.benchmark.{key} is missing")
            node = node[part]
    out = json.loads(json.dumps(dict(section)))
    if not isinstance(out["max_scans"], int) or out["max_scans"] < 2:
        raise BenchmarkError(f"{source}: register.benchmark.max_scans must be an "
                             f"integer >= 2 (a paired interval needs scans), got {out['max_scans']!r}")
    return out


def _paths(root: Path) -> dict[str, Any]:
    from pipelines.settings import load_params

    return load_params(root).get("paths") or {}


def manifest_dir(root: Path) -> Path:
    return Path(root) / _paths(root).get("benchmark", "frozen_benchmark")


def store_dir(root: Path) -> Path:
    return Path(root) / _paths(root).get("benchmark_store", "data/frozen_benchmark")


def versions(root: Path) -> list[int]:
    d = manifest_dir(root)
    found = []
    for p in d.glob("v*.json") if d.is_dir() else []:
        if p.stem[1:].isdigit():
            found.append(int(p.stem[1:]))
    return sorted(found)


def current_version(root: Path) -> int | None:
    v = versions(root)
    return v[-1] if v else None


def read_manifest(root: Path, version: int | None = None) -> dict[str, Any]:
    version = current_version(root) if version is None else int(version)
    if version is None:
        raise BenchmarkError(f"{manifest_dir(root)}: no benchmark frozen yet "
                             "(ctrlora-ops benchmark freeze)")
    path = manifest_dir(root) / f"v{version}.json"
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such benchmark version")
    try:
        m = json.loads(path.read_text())
    except ValueError as exc:
        raise BenchmarkError(f"{path}: not valid JSON ({exc})") from exc
    missing = [k for k in ("version", "scan_ids", "conditions", "pairs", "files", "origin",
                           "sampling", "bootstrap") if k not in m]
    if missing:
        raise BenchmarkError(f"{path}: manifest lacks {missing}")
    if m["version"] != version:
        raise BenchmarkError(f"{path}: says version {m['version']}, its name says {version}")
    if "condition_scans" in m:
        _check_condition_scans(m, path)
    return m


def _check_condition_scans(m: Mapping[str, Any], path: Path) -> None:
    """A per-condition manifest agrees with itself: a scan list for exactly its conditions, each
    the scan ids of that condition's pairs rows, ``scan_ids`` their union."""
    per = m["condition_scans"]
    if not isinstance(per, Mapping) or sorted(per) != sorted(m["conditions"]):
        raise BenchmarkError(f"{path}: condition_scans must hold one scan list per condition of "
                             f"{m['conditions']} (it holds {sorted(per) if isinstance(per, Mapping) else per!r})")
    for c, ids in per.items():
        rows = [r.get("scan_id") for r in m["pairs"].get(c, [])]
        if not isinstance(ids, list) or rows != ids:
            raise BenchmarkError(f"{path}: the {c!r} pairs rows are not the scans condition_scans lists for it")
    if sorted(set().union(*map(set, per.values()))) != list(m["scan_ids"]):
        raise BenchmarkError(f"{path}: scan_ids is not the union of condition_scans")


# ---------------------------------------------------------------------------- freeze / bump
def _workspace(root: Path) -> dict[str, Path]:
    p = _paths(root)
    return {k: Path(root) / p.get(k, d) for k, d in (
        ("prepared", "data/prepared"), ("rendered", "data/rendered"), ("scans", "data/scans"),
        ("detectors", "foundation/detectors"))}


def _conditions(root: Path) -> list[str]:
    from pipelines.settings import load_params

    params = load_params(root)
    conds = [*((params.get("train_base") or {}).get("conditions") or []),
             *((params.get("train_adapter") or {}).get("conditions") or [])]
    if not conds:
        raise BenchmarkError(f"{root / 'params.yaml'}: no conditions in train_base / train_adapter")
    return conds


def _current_splits(root: Path) -> dict[str, str] | None:
    path = _workspace(root)["prepared"] / "meta" / "splits.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {sid: split for split in ("train", "validation", "test") for sid in raw.get(split, [])}


def freeze(root: Path, *, bump: bool = False, reason: str = "", log=print) -> dict[str, Any]:
    """Write benchmark v1 (``bump=False``; refused when one exists) or v<N+1> (``bump=True``)
    from the workspace's prepared validation split and re-detectors; returns the manifest."""
    from ctrlora.data.pairs import read_pairs
    from ctrlora.evaluation.fidelity import DETECTED_CONDITIONS

    root = Path(root).resolve()
    have = versions(root)
    if have and not bump:
        raise BenchmarkError(f"{manifest_dir(root)}: benchmark v{have[-1]} is already frozen; a new "
                             "version is made only by `ctrlora-ops benchmark bump --reason ...`")
    if bump and not have:
        raise BenchmarkError(f"{manifest_dir(root)}: nothing to bump; `ctrlora-ops benchmark freeze` first")
    if bump and not reason.strip():
        raise BenchmarkError("benchmark bump needs --reason (it is recorded in the manifest)")
    version = (have[-1] + 1) if have else 1
    params, ws, conditions = benchmark_params(root), _workspace(root), _conditions(root)
    splits = _current_splits(root)
    if splits is None:
        raise BenchmarkError(f"{ws['prepared'] / 'meta' / 'splits.json'}: not found (run the prepare stage)")
    rows = {c: {r["scan_id"]: r for r in read_pairs(ws["prepared"], c, SPLIT)} for c in conditions}
    # each condition its own list: the first max_scans validation scans that have it
    scans: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    for c in conditions:
        ids = sorted(rows[c])[: params["max_scans"]]
        if len(ids) >= MIN_SCANS:
            scans[c] = ids
        else:
            refused[c] = (f"{len(ids)} {SPLIT} scan{'' if len(ids) == 1 else 's'} with {c!r}; a benchmark needs "
                          f"at least {MIN_SCANS} per condition (a paired interval needs scans)")
    if not scans:
        raise BenchmarkError(f"{ws['prepared']}: no condition has a benchmark: "
                             + "; ".join(f"{c}: {why}" for c, why in refused.items()))
    ids = sorted(set().union(*map(set, scans.values())))
    bad = [s for s in ids if splits.get(s) != SPLIT]
    if bad:
        raise BenchmarkError(f"{ws['prepared'] / 'meta' / 'splits.json'}: scans {bad[:5]} are not in "
                             f"the {SPLIT} split (rule: benchmark scans are never trained on)")
    origin: dict[str, str] = {}   # store path -> repo-relative source (a scan's photo: once)
    pairs: dict[str, list[dict[str, str]]] = {c: [] for c in scans}
    for c, cids in scans.items():
        for sid in cids:
            r = rows[c][sid]
            origin[f"prepared/{r['photo']}"] = _rel(ws["prepared"] / r["photo"], root)
            origin[f"prepared/{r['condition']}"] = _rel(ws["prepared"] / r["condition"], root)
            pairs[c].append({"scan_id": sid, "split": SPLIT, "photo": r["photo"],
                             "condition": r["condition"], "caption": r["caption"]})
    for sid in scans.get("segmentation", []):
        src = [s / sid / LABEL_FILE for s in (ws["rendered"], ws["scans"]) if (s / sid / LABEL_FILE).is_file()]
        if not src:
            raise BenchmarkError(f"scan {sid}: no raw {LABEL_FILE} under {ws['rendered']} or "
                                 f"{ws['scans']} (segmentation is scored against label maps)")
        origin[f"labels/{sid}/{LABEL_FILE}"] = _rel(src[0], root)
    for c in scans:
        if c not in DETECTED_CONDITIONS:
            continue
        d = ws["detectors"] / c
        files = sorted(p for p in d.glob("*") if p.is_file()) if d.is_dir() else []
        if not files:
            raise BenchmarkError(f"{d}: no re-detector for {c!r} (the re-detectors ship with the foundation: `make foundation`)")
        for f in files:
            origin[f"detectors/{c}/{f.name}"] = _rel(f, root)
    hashes = {k: sha256_file(root / v) for k, v in sorted(origin.items())}
    manifest = {
        "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": reason or "first frozen benchmark", "previous": have[-1] if have else None,
        "split": SPLIT, "scan_ids": ids, "conditions": list(scans),
        "condition_scans": scans, "refused": refused,
        "sampling": dict(params["sampling"]), "bootstrap": {**params["bootstrap"], "level": LEVEL},
        "grid_rows": int(params["grid_rows"]),
        "scan_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "pairs": pairs, "files": hashes, "origin": origin,
    }
    out = manifest_dir(root) / f"v{version}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out)
    materialize(root, version)
    log(f"benchmark v{version} frozen: {len(ids)} {SPLIT} scans (per condition: {scan_counts(manifest)}), "
        f"{len(hashes)} files -> {_rel(out, root)} (store {_rel(store_dir(root) / f'v{version}', root)})")
    for c, why in refused.items():
        log(f"benchmark v{version} has no {c!r} benchmark: {why}; {c} versions keep their champion "
            "until `ctrlora-ops benchmark bump` finds its scans")
    return manifest


def scan_counts(manifest: Mapping[str, Any]) -> str:
    """``segmentation 3, depth 2, ...``: how many scans each condition of ``manifest`` holds."""
    per = manifest.get("condition_scans") or {c: manifest["scan_ids"] for c in manifest["conditions"]}
    return ", ".join(f"{c} {len(ids)}" for c, ids in per.items())


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the project (not resolved: a workspace may hold symlinked data)."""
    return Path(os.path.relpath(Path(path).absolute(), Path(root).absolute())).as_posix()


# ---------------------------------------------------------------------------- materialize / open
def materialize(root: Path, version: int | None = None) -> Path:
    """The store folder of ``version`` (default: current) with every file the manifest lists,
    each checked against its sha256; missing files are copied from their recorded origin when
    that file still has the frozen content. Returns the folder."""
    root = Path(root).resolve()
    m = read_manifest(root, version)
    where = manifest_dir(root) / f"v{m['version']}.json"
    store = store_dir(root) / f"v{m['version']}"
    for rel, digest in m["files"].items():
        dst = store / rel
        if dst.is_file():
            if sha256_file(dst) == digest:
                continue
            raise BenchmarkError(f"{dst}: content differs from {where} (sha256 {digest[:12]}); "
                                 "rule: a frozen benchmark never changes -- restore it or bump")
        src = root / m["origin"].get(rel, "")
        if not src.is_file():
            raise BenchmarkError(f"{dst}: missing, and its origin {src} is gone too; restore the "
                                 f"store (rule: benchmark v{m['version']} is frozen)")
        if sha256_file(src) != digest:
            raise BenchmarkError(f"{dst}: missing, and its origin {src} now has other content "
                                 f"than {where} records; rule: a frozen benchmark never changes "
                                 "-- restore the store or `ctrlora-ops benchmark bump`")
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(dst.name + ".part")
        shutil.copyfile(src, part)
        os.replace(part, dst)
    for c, rows in m["pairs"].items():  # the pairs index, written from the manifest itself
        f = store / "prepared" / "conditions" / c / "pairs.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        if not f.is_file() or f.read_text() != text:
            f.write_text(text)
    return store


@dataclass
class Benchmark:
    """One verified benchmark version: ``store`` holds its frozen files."""

    version: int
    manifest: dict[str, Any]
    store: Path

    @property
    def scan_ids(self) -> list[str]:
        """Every scan of the version (the union of the conditions' lists)."""
        return list(self.manifest["scan_ids"])

    def scans(self, condition: str) -> list[str]:
        """``condition``'s benchmark scans in order: scan ``i`` is sampled with ``seed + i`` on both
        sides. A manifest without ``condition_scans`` holds one list for every condition."""
        if condition not in self.manifest["conditions"]:
            why = (self.manifest.get("refused") or {}).get(condition)
            if why:
                raise BenchmarkError(f"benchmark v{self.version} has no {condition!r} scans: {why} when it "
                                     "was frozen; `ctrlora-ops benchmark bump` once the validation split has them")
            raise BenchmarkError(f"benchmark v{self.version} has no {condition!r} scans "
                                 f"(it holds {self.manifest['conditions']}); bump it")
        per = self.manifest.get("condition_scans")
        return list(per[condition] if per is not None else self.manifest["scan_ids"])

    def data(self, condition: str):
        """The benchmark scans of ``condition`` as an :class:`~ctrlora.evaluation.loading.EvalData`."""
        from ctrlora.evaluation.loading import load_split

        want = self.scans(condition)
        data = load_split(self.store / "prepared", SPLIT, [condition], [self.store / "labels"],
                          progress=False)
        if data.scan_ids != want:
            raise BenchmarkError(f"{self.store}: {condition} scans {data.scan_ids[:3]}... differ from the manifest's")
        return data

    def detectors(self, condition: str) -> dict[str, Any]:
        """The frozen re-detector of ``condition`` (``{}`` for conditions scored without one)."""
        from ctrlora.evaluation.detectors import load_detector
        from ctrlora.evaluation.fidelity import DETECTED_CONDITIONS

        if condition not in DETECTED_CONDITIONS:
            return {}
        return {condition: load_detector(self.store / "detectors" / condition)}

    def sampling(self):
        from ctrlora.evaluation.generation import SamplingConfig

        return SamplingConfig(**self.manifest["sampling"])


def open_benchmark(root: Path, version: int | None = None) -> Benchmark:
    """The current (or given) version, materialized and verified, its scans checked against the
    workspace's current split (never trained on)."""
    root = Path(root).resolve()
    m = read_manifest(root, version)
    store = materialize(root, m["version"])
    splits = _current_splits(root) or {}
    leaked = [s for s in m["scan_ids"] if splits.get(s) not in (None, SPLIT)]
    if leaked:
        raise BenchmarkError(f"{_workspace(root)['prepared'] / 'meta' / 'splits.json'}: benchmark "
                             f"v{m['version']} scans {leaked[:5]} are now in "
                             f"{sorted({splits[s] for s in leaked})} (rule: benchmark scans are never "
                             "trained on); bump the benchmark")
    return Benchmark(int(m["version"]), m, store)


# ---------------------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    """Champion and challenger scored on one benchmark version at one residual weight: per-scan
    primary fidelity, the paired interval of (challenger - champion), both sides' images, the
    side-by-side grid."""

    condition: str
    metric: str
    champion: Any          # float64 [scans]
    challenger: Any        # float64 [scans]
    interval: Any          # ctrlora.evaluation.stats.Interval
    grid: Path | None
    weight: float
    images: dict[str, Any] = field(default_factory=dict)   # side -> uint8 [scans, H, W, 3]


def benchmark_job(bench: Benchmark, condition: str, weight: float):
    """The evaluation's generation job for one side of a comparison: every benchmark scan of
    ``condition`` (row ``i``: seed + i) at the benchmark's guidance, ``condition``'s map through
    the adapter loaded under its name, at residual weight ``weight``."""
    import math

    from ctrlora.evaluation.run import GenerationJob

    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise BenchmarkError(f"benchmark v{bench.version}: residual weight must be finite and >= 0, got {weight}")
    n = len(bench.scans(condition))
    return GenerationJob(float(bench.manifest["sampling"]["guidance_scale"]), n, condition,
                         {condition: (condition, weight, condition)}, tuple(range(n)))


def compare(bench: Benchmark, condition: str, champion: Mapping[str, Path],
            challenger: Mapping[str, Path], grid_path: Path | None = None,
            titles: tuple[str, str] = ("champion", "challenger"), *, weight: float) -> Comparison:
    """Generate and score both sides (``{"backbone", "base", "adapter"}`` directories) on the
    benchmark's scans of ``condition`` with its sampler, seeds and re-detectors, both at residual weight
    ``weight``; the grid is condition | champion | challenger for the first ``grid_rows`` scans."""
    import numpy as np

    from ctrlora.device import default_device
    from ctrlora.evaluation.fidelity import PRIMARY_METRIC
    from ctrlora.evaluation.grids import save_grid
    from ctrlora.evaluation.loading import condition_cell, load_models
    from ctrlora.evaluation.run import run_job
    from ctrlora.evaluation.scoring import per_scan_fidelity
    from ctrlora.evaluation.stats import bootstrap_diff
    from ctrlora.sampling import CtrLoRAPipeline
    from pipelines.stages.common import resolve_backbone

    data, detectors, sampling = bench.data(condition), bench.detectors(condition), bench.sampling()
    job = benchmark_job(bench, condition, weight)
    images, scores = {}, {}
    for side, parts in (("champion", champion), ("challenger", challenger)):
        models = load_models(resolve_backbone(Path(parts["backbone"])), parts["base"],
                             {condition: parts["adapter"]})
        # the evaluation's own generation of one pass (scan i sampled with seed + i), on the
        # device the evaluation uses, then its per-scan primary fidelity
        pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet).to(default_device())
        pipe.set_progress_bar_config(disable=True)
        images[side] = run_job(pipe, data, job, sampling)
        scores[side] = np.asarray(per_scan_fidelity(condition, images[side], data, detectors), dtype=np.float64)
        del pipe, models
    boot = bench.manifest["bootstrap"]
    iv = bootstrap_diff(scores["challenger"], scores["champion"], n_boot=int(boot["n_boot"]),
                        seed=int(boot["seed"]), level=float(boot.get("level", LEVEL)))
    grid = None
    if grid_path is not None:
        rows = min(int(bench.manifest.get("grid_rows", 8)), len(data))
        grid = save_grid([[condition_cell(condition, data, i), images["champion"][i],
                           images["challenger"][i]] for i in range(rows)],
                         grid_path, titles=[condition, *titles])
    return Comparison(condition, PRIMARY_METRIC[condition], scores["champion"], scores["challenger"], iv, grid,
                      float(job.controls[condition][1]), images)


class UnusableBenchmark:
    """The judge when the benchmark cannot be trusted: every comparison fails with the reason,
    so no alias moves (a model's first version still takes it: nothing to compare with)."""

    def __init__(self, error: str, version: int | None = None):
        self.error = error
        self.tags = {"benchmark_error": error[:1000]}
        if version is not None:
            self.tags["benchmark_version"] = str(version)

    def compare(self, *args, **kwargs):
        raise RuntimeError(f"benchmark unusable: {self.error}")

    def close(self) -> None:
        pass

    def __enter__(self) -> "UnusableBenchmark":
        return self

    def __exit__(self, *exc) -> None:
        pass


class BenchmarkGate:
    """The judge of :func:`pipelines.registry.registration.register_adapter`: the challenger against the
    champion on one benchmark version, decided by params.yaml ``register.gate``."""

    def __init__(self, bench: Benchmark, gate: Mapping[str, Any]):
        from pipelines.registry.gate import gate_config

        self.bench, self.gate = bench, gate_config(gate)
        self.tags = {"benchmark_version": str(bench.version)}
        self._out = Path(tempfile.mkdtemp(prefix="ctrlora-gate-out-"))  # grids until logged

    def close(self) -> None:
        shutil.rmtree(self._out, ignore_errors=True)

    def __enter__(self) -> "BenchmarkGate":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def compare(self, name: str, champion_mv, challenger_mv, challenger: Mapping[str, Path]):
        import numpy as np

        from pipelines.registry.gate import WEIGHT_TAG, comparison_weight, paired_decision
        from pipelines.registry.models import resolve_adapter_uri
        from pipelines.registry.registration import GateOutcome

        condition = challenger_mv.tags.get("condition") or name.split("-", 1)[1]
        scan_ids = self.bench.scans(condition)   # a condition the version left out: refused here
        champ_v = str(champion_mv.version)
        # one weight for both sides (the pairing stays a comparison of adapters): the challenger's
        # recipe weight, what the alias serves if it moves
        weight = comparison_weight(challenger_mv.tags, f"{name} v{challenger_mv.version}")
        try:
            champ_weight = comparison_weight(champion_mv.tags, f"{name} v{champ_v}")
        except ValueError:
            champ_weight = None
        work = Path(tempfile.mkdtemp(prefix=f"ctrlora-gate-{condition}-"))
        try:
            resolved = resolve_adapter_uri(f"models:/{name}/{champ_v}", work / "champion")
            champion = {"backbone": resolved.backbone, "base": resolved.base, "adapter": resolved.adapter}
            grid = work / f"{condition}_v{champ_v}_vs_v{challenger_mv.version}.png"
            res = compare(self.bench, condition, champion, challenger, grid,
                          titles=(f"champion v{champ_v}", f"challenger v{challenger_mv.version}"),
                          weight=weight)
            iv = res.interval
            same = champion_mv.tags.get("dataset_hash") == challenger_mv.tags.get("dataset_hash")
            diffs = res.challenger - res.champion
            ok, reason = paired_decision(self.gate, iv.value, iv.low, iv.high, champion_version=champ_v,
                                         same_data=same, all_zero=bool(np.all(diffs == 0)),
                                         level=iv.level)
            at = f"residual weight {weight:g}"
            if champ_weight != weight:
                at += (f" (challenger's recipe; champion v{champ_v}'s recipe says "
                       f"{'?' if champ_weight is None else format(champ_weight, 'g')})")
            reason = f"benchmark v{self.bench.version}, {res.metric} on {iv.n} scans at {at}: {reason}"
            tags = {**self.tags, "gate_rule": self.gate["rule"], "gate_metric": res.metric,
                    "gate_champion_version": champ_v, WEIGHT_TAG: repr(weight),
                    "gate_delta": repr(round(iv.value, 6)), "gate_low": repr(round(iv.low, 6)),
                    "gate_high": repr(round(iv.high, 6)), "gate_n_scans": str(iv.n),
                    "gate_level": str(iv.level), "gate_tie": "true" if bool(np.all(diffs == 0)) else "false",
                    "gate_champion_mean": repr(round(float(res.champion.mean()), 6)),
                    "gate_challenger_mean": repr(round(float(res.challenger.mean()), 6)),
                    "gate_grid": f"runs:/{challenger_mv.run_id}/gate/{grid.name}"}
            metrics = {"gate_delta": iv.value, "gate_low": iv.low, "gate_high": iv.high,
                       "gate_champion_mean": float(res.champion.mean()),
                       "gate_challenger_mean": float(res.challenger.mean()),
                       "benchmark_version": float(self.bench.version), WEIGHT_TAG: weight}
            per_scan = work / f"{condition}_per_scan.csv"
            per_scan.write_text("scan_id,champion,challenger\n" + "".join(
                f"{s},{a:.6f},{b:.6f}\n" for s, a, b in zip(scan_ids, res.champion,
                                                           res.challenger)))
            keep = self._out / f"{condition}-v{challenger_mv.version}"
            keep.mkdir(parents=True, exist_ok=True)
            arts = [Path(shutil.copy2(p, keep / p.name)) for p in (grid, per_scan)]
            return GateOutcome(ok, reason, tags, metrics, arts)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def gate_for(root: Path, gate: Mapping[str, Any], log=print, freeze_missing: bool = True):
    """The judge for the project at ``root``: a :class:`BenchmarkGate` on the current version.
    With no frozen benchmark, v1 is frozen here from the validation split (``freeze_missing``);
    when that is impossible, None, and :class:`UnusableBenchmark` when a version does not verify
    (in both cases later versions keep the champion, saying why)."""
    if current_version(root) is None:
        if not freeze_missing:
            log(f"register: no frozen benchmark in {manifest_dir(root)}; only a model's first version "
                "takes the alias (ctrlora-ops benchmark freeze)")
            return None
        try:
            m = freeze(root, reason="frozen at this deployment's first registration", log=log)
        except BenchmarkError as exc:
            log(f"register: no frozen benchmark, and none could be frozen ({exc}); only a model's first "
                "version takes the alias")
            return None
        log(f"register: froze benchmark v{m['version']} ({len(m['scan_ids'])} {SPLIT} scans; per condition: "
            f"{scan_counts(m)}) in "
            f"{manifest_dir(root) / 'v1.json'}; a deployment commits it (docs/mlops.md)")
    try:
        return BenchmarkGate(open_benchmark(root), gate)
    except BenchmarkError as exc:
        log(f"register: the benchmark cannot be used, no alias will move: {exc}")
        return UnusableBenchmark(str(exc), current_version(root))


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.settings import REPO_ROOT

    sub = parser.add_subparsers(dest="benchmark_command", required=True, metavar="ACTION")
    p = sub.add_parser("freeze", help="write benchmark v1 from the validation split and re-detectors")
    p.add_argument("--repo", type=Path, default=REPO_ROOT)
    p = sub.add_parser("bump", help="write the next benchmark version (the only way it changes)")
    p.add_argument("--reason", required=True, help="why (recorded in the manifest)")
    p.add_argument("--repo", type=Path, default=REPO_ROOT)
    p = sub.add_parser("show", help="the current version, its scans, and whether it verifies")
    p.add_argument("--json", action="store_true")
    p.add_argument("--repo", type=Path, default=REPO_ROOT)


def run(args: argparse.Namespace) -> int:
    try:
        if args.benchmark_command in ("freeze", "bump"):
            freeze(args.repo, bump=args.benchmark_command == "bump",
                   reason=getattr(args, "reason", "") or "")
            return 0
        bench = open_benchmark(args.repo)
    except BenchmarkError as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 1
    m = bench.manifest
    info = {"version": bench.version, "created": m["created"], "reason": m["reason"],
            "scans": len(m["scan_ids"]), "conditions": m["conditions"],
            "scans_per_condition": {c: len(bench.scans(c)) for c in m["conditions"]},
            "refused": dict(m.get("refused") or {}), "sampling": m["sampling"],
            "bootstrap": m["bootstrap"], "store": str(bench.store), "verified": True,
            "versions": versions(args.repo)}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"benchmark v{bench.version} ({m['created']}; {m['reason']}): {info['scans']} scans; "
              f"per condition {scan_counts(m)}; sampling {m['sampling']}; "
              f"every file verified in {bench.store}")
        for c, why in info["refused"].items():
            print(f"  no {c} benchmark: {why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.registry.frozen_benchmark",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
