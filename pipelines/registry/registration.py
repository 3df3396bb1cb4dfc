"""Register one adapter as a version of ``ctrlora-<condition>`` and apply the gate.

A version is tied to the data it was trained on (``dataset_hash``: the hash DVC records in
``dvc.lock`` for ``data/prepared/conditions/<condition>``), to its base (``base_hash``, and where
that base came from: ``base_source``, ``trained`` or ``imported`` with the published checkpoint's
sha256, read from the base folder's ``base_source.json``), to its own file (``adapter_hash``:
sha256 of ``adapter_model.safetensors``) and to the code (``git_commit``).
Registration is idempotent: the same adapter hash and dataset hash return the existing version
and create nothing; so does the same adapter hash on the same base (identical bytes are the same
model: a base condition's adapter that did not retrain because the base waited for more data keeps
its version and the dataset hash it was trained on).

The version's model is the pyfunc of :mod:`pipelines.registry.pyfunc`, logged as code
(:mod:`pipelines.registry.pyfunc_model`; nothing is pickled) with the adapter directory and ``parts.json``
as artifacts. The backbone and the base ControlNet are logged once per content hash, each as the
artifacts of a run of its own, and ``parts.json`` references them (:mod:`pipelines.registry.models`):
a hundred adapter versions on one SD 1.5 backbone store it once.

The gate: the first version of a model takes ``champion``. Every later one is compared with the
champion by ``judge`` (:class:`pipelines.registry.frozen_benchmark.BenchmarkGate`: both scored in one run on the
frozen benchmark at the challenger's recipe weight, paired bootstrap); without a judge, or when the
comparison fails, the champion stays and the reason says why. The decision, its interval, the
benchmark version, the weight and the side-by-side grid go to the version's tags and to the
registering run.

No ``code_paths`` are copied: the loading process imports the installed
``ctrlora-dental`` package, so ``ctrlora``/``pipelines`` are imported once, from one place, and
the ``git_commit`` tag says which code produced the version. (``code_paths`` would put a frozen
snapshot of ``ctrlora/`` first on ``sys.path``; in a process that has already imported
``ctrlora`` the snapshot and the installed package would mix.)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version as dist_version
from pathlib import Path
from typing import Any, Mapping

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ctrlora.data.files import sha256_file
from ctrlora.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pipelines.registry.gate import comparison_weight, flatten_metrics, gate_config, metric_tags
from pipelines.registry.lock import locked_by_model
from pipelines.registry.pyfunc import SIGNATURE
from pipelines.registry.models import (CHAMPION, CHALLENGER, HASH_TAG, PART_TAG, PARTS_FILE, PromotionResult,
                                       RegistryError, _now, _set_champion, _tag_version, alias_version,
                                       dir_hash, find_version, model_name, record_decision,
                                       require_version, resolve_adapter_uri)
from pipelines.settings import PREPARED_CONDITIONS, REPO_ROOT
from pipelines.stages.train_base import SOURCE_RECORD

# The models-from-code file; referred to by path (importing it would set a model as a side effect).
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
RECIPE_FILE = "recipe.json"       # the sampling a version was evaluated with (the pyfunc's defaults)
CARD_FILE = "README.md"           # the model card stored beside a version's weights
EXPERIMENT = "ctrlora-register"   # overridden by MLFLOW_EXPERIMENT_NAME
# Pinned into every version's requirements, so a loading environment can be rebuilt.
REQUIREMENTS = ("ctrlora-dental", "torch", "diffusers", "peft", "transformers", "safetensors",
                "accelerate", "pillow", "numpy", "pandas", "mlflow")


@dataclass
class GateOutcome:
    """A judge's decision on a challenger: ``tags`` go to the version and the run, ``metrics`` and
    ``artifacts`` (files, e.g. the side-by-side grid) to the run."""

    promoted: bool
    reason: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


@dataclass
class RegistrationResult:
    condition: str
    model_name: str
    version: str
    created: bool                 # False: an identical version already existed (idempotent hit)
    decision: str                 # "champion" | "challenger" | "unchanged"
    reason: str
    champion: str | None          # champion version after this call
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@locked_by_model(model_name)  # lookup, new version and gate: one registration at a time per model
def register_adapter(condition: str, adapter_dir: str | Path, *, dataset_hash: str, base_hash: str,
                     backbone_dir: str | Path, base_dir: str | Path,
                     metrics: Mapping[str, Any] | None, git_commit: str,
                     gate: Mapping[str, Any] | None = None,
                     dataset_path: str | Path | None = None,
                     judge: Any = None, recipe: Mapping[str, Any] | None = None) -> RegistrationResult:
    """Register ``adapter_dir`` as a version of ``ctrlora-<condition>`` and apply the gate.

    Idempotent: a version with the same ``adapter_hash`` and ``dataset_hash`` (or the same
    ``adapter_hash`` and ``base_hash``: the same model) is returned as is
    (nothing is created; its gate decision is not re-taken, so a rollback is not undone by
    running the pipeline again). ``dataset_path``: where the data set lives, recorded as the
    MLflow input's source (default ``data/prepared/conditions/<condition>`` of the repo).
    ``judge``: compares the new version with the champion (``judge.compare(...)`` returns a
    :class:`GateOutcome`; ``judge.tags`` are put on every version it sees); ``None``: a version
    takes the alias only when there is no champion yet. ``recipe``: the sampling it was evaluated
    with (scheduler, steps, guidance_scale, weight), stored with the model (``recipe.json``, the
    pyfunc's defaults) and as the version's ``recipe`` tag.
    """
    adapter_dir, backbone_dir, base_dir = Path(adapter_dir), Path(backbone_dir), Path(base_dir)
    _check_parts(adapter_dir, backbone_dir, base_dir)
    gate = gate_config(gate)
    adapter_hash = sha256_file(adapter_dir / ADAPTER_WEIGHTS)
    name = model_name(condition)
    client = MlflowClient()

    existing = find_version(condition, adapter_hash, dataset_hash, base_hash)
    if existing is not None:
        return _existing_result(client, condition, existing, judge,
                                _local_parts(backbone_dir, base_dir, adapter_dir))

    provenance = base_provenance(base_dir, base_hash)
    flat = flatten_metrics(metrics)
    tags = {"condition": condition, "dataset_hash": dataset_hash, "base_hash": base_hash, **provenance,
            "adapter_hash": adapter_hash, "git_commit": git_commit, **metric_tags(flat)}
    if recipe:
        tags["recipe"] = json.dumps(dict(recipe), sort_keys=True)
    dataset_path = Path(dataset_path or REPO_ROOT / PREPARED_CONDITIONS / condition)
    exp_id = experiment_id(client)
    with tempfile.TemporaryDirectory(prefix="ctrlora-register-") as tmp:
        refs = {"backbone": log_part(client, exp_id, "backbone", backbone_dir, Path(tmp)),
                "base": log_part(client, exp_id, "base", base_dir, Path(tmp),
                                 skip_top=("adapters",))}
        tags.update({f"{k}_content_hash": r["content_hash"] for k, r in refs.items()})
        parts_file = Path(tmp) / PARTS_FILE
        parts_file.write_text(json.dumps(refs, indent=1, sort_keys=True) + "\n")
        artifacts = {"adapter": _stage_dir(adapter_dir, Path(tmp) / "adapter"), "parts": str(parts_file)}
        card = Path(tmp) / CARD_FILE
        card.write_text(model_card(condition, dataset_hash=dataset_hash, base_hash=base_hash,
                                   adapter_hash=adapter_hash, git_commit=git_commit, metrics=metrics,
                                   recipe=recipe, base_source=provenance))
        artifacts["card"] = str(card)
        if recipe:
            recipe_file = Path(tmp) / RECIPE_FILE
            recipe_file.write_text(json.dumps(dict(recipe), indent=1, sort_keys=True) + "\n")
            artifacts["recipe"] = str(recipe_file)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{condition}") as run:
            _log_run_record(condition, adapter_dir, backbone_dir, base_dir, gate, flat, tags)
            _log_dataset_input(condition, dataset_path, dataset_hash)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts=artifacts,
                signature=SIGNATURE, pip_requirements=pip_requirements(),
                metadata={"condition": condition, "dataset_hash": dataset_hash,
                          "adapter_hash": adapter_hash, "base_hash": base_hash},
            )
            mv = mlflow.register_model(info.model_uri, name, tags=tags)
    client.update_registered_model(name, description=f"CtrLoRA adapter for the '{condition}' condition")
    mv = client.get_model_version(name, str(mv.version))
    promoted, reason, champion = _decide(client, name, mv, judge,
                                         _local_parts(backbone_dir, base_dir, adapter_dir))
    mv = client.get_model_version(name, str(mv.version))
    return RegistrationResult(condition, name, str(mv.version), True,
                              CHAMPION if promoted else CHALLENGER, reason, champion,
                              run.info.run_id, dict(mv.tags))


def _local_parts(backbone_dir: Path, base_dir: Path, adapter_dir: Path) -> dict[str, Path]:
    return {"backbone": backbone_dir, "base": base_dir, "adapter": adapter_dir}


def _decide(client: MlflowClient, name: str, mv, judge: Any,
            challenger: Mapping[str, Path]) -> tuple[bool, str, str | None]:
    """Gate version ``mv`` against the champion, record the decision on the version and its
    run; returns (promoted, reason, champion after the call)."""
    version = str(mv.version)
    champ_v = alias_version(client, name, CHAMPION)
    base_tags = {str(k): str(v) for k, v in (getattr(judge, "tags", None) or {}).items()}
    if champ_v == version:
        return True, f"v{version} already champion", champ_v
    if champ_v is None:
        where = f" (benchmark v{base_tags['benchmark_version']})" if "benchmark_version" in base_tags else ""
        outcome = GateOutcome(True, f"first version of {name}: no champion yet, so it takes the "
                                    f"alias without a comparison{where}", dict(base_tags))
    elif judge is None:
        outcome = GateOutcome(False, f"no frozen benchmark to compare v{version} with champion "
                                     f"v{champ_v} on (ctrlora-ops benchmark freeze); champion kept")
    else:
        try:
            outcome = judge.compare(name, client.get_model_version(name, champ_v), mv, challenger)
        except (RegistryError, MlflowException, OSError, ValueError, RuntimeError, KeyError) as exc:
            outcome = GateOutcome(False, f"champion v{champ_v} kept: the benchmark comparison of "
                                         f"v{version} failed: {exc}", dict(base_tags))
    tags = {**outcome.tags, "gate_decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    champion = record_decision(client, name, version, outcome.promoted, outcome.reason, tags)
    _log_outcome(client, mv.run_id, outcome, tags)
    return outcome.promoted, outcome.reason, champion


def base_provenance(base_dir: Path, base_hash: str) -> dict[str, str]:
    """Where the base ControlNet a version was trained on came from, as the version's tags.

    ``<base_dir>/base_source.json`` is written by ``train_base`` in imported mode only, so its
    absence means the project trained the base (``{"base_source": "trained"}``). When present it
    gives ``base_source: imported`` and the published checkpoint's sha256 and format
    (``base_checkpoint_sha256``, ``base_checkpoint_format``); a record that is not valid JSON, lacks
    those facts or describes another base than ``base_hash`` is refused, naming the file."""
    path = Path(base_dir) / SOURCE_RECORD
    if not path.is_file():
        return {"base_source": "trained"}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    source, sha = record.get("source"), record.get("checkpoint_sha256")
    if source != "imported":
        raise ValueError(f"{path}: 'source' must be 'imported' (only an imported base has this record), got {source!r}")
    if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise ValueError(f"{path}: 'checkpoint_sha256' must be the checkpoint's sha256 (64 lowercase hex digits), "
                         f"got {sha!r}")
    if record.get("base_hash") != base_hash:
        raise ValueError(f"{path}: records base_hash {record.get('base_hash')!r}, but the adapter was trained on "
                         f"base {base_hash!r}: this base folder is not the base of the adapter")
    tags = {"base_source": "imported", "base_checkpoint_sha256": sha}
    if isinstance(record.get("checkpoint_format"), str):
        tags["base_checkpoint_format"] = record["checkpoint_format"]
    return tags


def _source_line(base_source: Mapping[str, str] | None) -> list[str]:
    """The model card's row on where the base came from (none when not known)."""
    source = (base_source or {}).get("base_source")
    if source == "imported":
        fmt = base_source.get("base_checkpoint_format")
        return [f"| base ControlNet source | imported: converted from a published-layout checkpoint "
                f"(sha256 `{base_source['base_checkpoint_sha256']}`{f', .{fmt}' if fmt else ''}) and kept frozen; "
                "only the adapters were trained here |"]
    if source == "trained":
        return ["| base ControlNet source | trained by this project (`train_base`, source `trained`) |"]
    return []


def model_card(condition: str, *, dataset_hash: str, base_hash: str, adapter_hash: str, git_commit: str,
               metrics: Mapping[str, Any] | None, recipe: Mapping[str, Any] | None,
               base_source: Mapping[str, str] | None = None) -> str:
    """The model card stored with a version: what it is, what it was trained on (data, base and
    where that base came from: ``base_source``, the tags of :func:`base_provenance`), how it was
    evaluated (gain over no control with its interval) and sampled, its intended use and limits.
    The promotion decision comes later; it is on the version's tags and its run's ``gate/``."""
    m = dict(metrics or {})
    gain = m.get("gain") if isinstance(m.get("gain"), Mapping) else None
    lines = [f"# ctrlora-{condition}", "",
             f"A CtrLoRA condition adapter for **{condition}** maps (LoRA on every Linear of the Base "
             "ControlNet, with its own zero convolutions and transformer norms), to be loaded with the "
             "backbone and base ControlNet its `parts.json` names.", "",
             "| what | value |", "|---|---|",
             f"| dataset hash (DVC) | `{dataset_hash}` |", f"| base ControlNet hash | `{base_hash}` |",
             *_source_line(base_source),
             f"| adapter hash (sha256) | `{adapter_hash}` |", f"| code (git commit) | `{git_commit}` |"]
    if gain:
        lines.append(f"| evaluation | {m.get('metric', 'fidelity')} {m.get('fidelity', float('nan')):.4f} on "
                     f"{m.get('n_scans', '?')} test scans; gain over no control {gain['value']:+.4f} "
                     f"[{gain['low']:+.4f}, {gain['high']:+.4f}] ({float(gain.get('level', 0.95)):.0%} paired "
                     "bootstrap over scans) |")
    if recipe:
        lines.append("| sampling recipe (what it was evaluated with; serving's default) | " +
                     ", ".join(f"{k} {v}" for k, v in sorted(recipe.items())) + " |")
    lines += ["", "## Intended use and limits", "",
              "* Generating intraoral images whose structure follows a condition map, to review or to "
              "grow an annotated set; generated images are not clinical evidence.",
              "* The figures hold for the data this version was trained and evaluated on (the dataset "
              "hash above); other cameras, resolutions or populations need their own evaluation.",
              "* Before sharing generated images outside the clinic, check they are not copies of "
              "training photographs.",
              "* Promotion: see the version's `gate_reason` tag (the paired comparison with the champion "
              "on the frozen benchmark).", ""]
    return "\n".join(lines)


def _stored_outcome(gate: Mapping[str, Any], mv, champion_mv, benchmark_version: str | None,
                    weight: float) -> GateOutcome | None:
    """The paired comparison a version already carries, when it was made against exactly this
    champion, on exactly this benchmark version, at exactly this residual weight (a comparison
    recorded without a weight was sampled at 1); else None: it must be run."""
    from pipelines.registry.gate import WEIGHT_TAG, paired_decision, recorded_weight

    t = mv.tags
    champ_v = str(champion_mv.version)
    needed = ("gate_champion_version", "benchmark_version", "gate_delta", "gate_low", "gate_high", "gate_tie")
    if any(k not in t for k in needed) or t["gate_champion_version"] != champ_v \
            or benchmark_version is None or t["benchmark_version"] != str(benchmark_version) \
            or recorded_weight(t) != float(weight):
        return None
    same = champion_mv.tags.get("dataset_hash") == t.get("dataset_hash")
    level = float(t.get("gate_level", "0.95"))
    ok, reason = paired_decision(gate, float(t["gate_delta"]), float(t["gate_low"]), float(t["gate_high"]),
                                 champion_version=champ_v, same_data=same, all_zero=t["gate_tie"] == "true",
                                 level=level)
    metric = t.get("gate_metric", "fidelity")
    return GateOutcome(ok, f"benchmark v{benchmark_version}, {metric} on {t.get('gate_n_scans', '?')} scans "
                           f"at residual weight {float(weight):g} (the comparison recorded at registration): "
                           f"{reason}",
                       {"benchmark_version": str(benchmark_version), "gate_rule": gate_config(gate)["rule"],
                        WEIGHT_TAG: repr(float(weight))})


def promote(condition: str, version: str | int, *, judge: Any = None, gate: Mapping[str, Any] | None = None,
            force: bool = False, reason: str = "") -> PromotionResult:
    """Move ``champion`` to ``version`` on evidence only: the paired comparison with the current
    champion on the frozen benchmark at the version's recipe weight -- the one the version carries
    when it was made against exactly this champion and benchmark version at that weight, else run
    now by ``judge`` (a
    :class:`~pipelines.registry.frozen_benchmark.BenchmarkGate`); without either, refused. A
    refused version becomes ``challenger``. ``force`` skips the comparison and needs a
    ``reason``, recorded on the version (``forced``, ``forced_reason``, ``forced_over``)."""
    client = MlflowClient()
    name = model_name(condition)
    mv = require_version(client, name, str(version))
    version = str(mv.version)
    champ_v = alias_version(client, name, CHAMPION)
    if champ_v == version:
        return PromotionResult(condition, version, True, champ_v, f"v{version} already champion")
    if force:
        why = (reason or "").strip()
        if not why:
            raise RegistryError("a forced promotion needs a reason (--reason TEXT); it is recorded on the version")
        text = f"forced by hand over champion v{champ_v}: {why}" if champ_v else f"forced by hand: {why}"
        previous = _set_champion(client, name, version)
        _tag_version(client, name, version, gate=CHAMPION, gate_reason=text, promoted_at=_now(), forced="true",
                     forced_reason=why[:5000], forced_over=champ_v or "")
        if mv.run_id:
            client.set_tag(mv.run_id, "forced_reason", why[:5000])
        return PromotionResult(condition, version, True, previous, text)
    if champ_v is None:
        outcome = GateOutcome(True, f"no champion yet: v{version} takes the alias", dict(getattr(judge, "tags", {}) or {}))
    else:
        champion_mv = client.get_model_version(name, champ_v)
        bench_v = (getattr(judge, "tags", None) or {}).get("benchmark_version")
        try:  # the weight a comparison would sample both sides at: the version's recipe weight
            weight = comparison_weight(mv.tags, f"{name} v{version}")
        except ValueError as exc:
            raise RegistryError(str(exc)) from exc
        outcome = _stored_outcome(gate_config(gate or getattr(judge, "gate", None)), mv, champion_mv, bench_v,
                                  weight) if judge is not None else None
        if outcome is None:
            if judge is None or not hasattr(judge, "bench"):
                why = getattr(judge, "error", None) or "no frozen benchmark to compare on"
                raise RegistryError(f"{name} v{version}: no paired comparison with champion v{champ_v} "
                                    f"({why}); promotion needs one, or --force --reason TEXT")
            resolved = resolve_adapter_uri(f"models:/{name}/{version}")
            outcome = judge.compare(name, champion_mv, mv, {"backbone": resolved.backbone,
                                                            "base": resolved.base, "adapter": resolved.adapter})
    tags = {**outcome.tags, "gate_decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    champion = record_decision(client, name, version, outcome.promoted, outcome.reason, tags)
    _log_outcome(client, mv.run_id, outcome, tags)
    previous = champ_v if outcome.promoted else champion
    return PromotionResult(condition, version, outcome.promoted, previous, outcome.reason)


def _log_outcome(client: MlflowClient, run_id: str | None, outcome: GateOutcome,
                 tags: Mapping[str, str]) -> None:
    """The decision on the registering run: tags, numbers and the grid under ``gate/``."""
    if not run_id:
        return
    for key, value in {"gate": CHAMPION if outcome.promoted else CHALLENGER,
                       "gate_reason": outcome.reason, **tags}.items():
        client.set_tag(run_id, key, str(value)[:5000])
    for key, value in outcome.metrics.items():
        client.log_metric(run_id, key, float(value))
    for path in outcome.artifacts:
        client.log_artifact(run_id, str(path), artifact_path="gate")


def log_part(client: MlflowClient, exp_id: str, kind: str, src: Path, tmp: Path,
             skip_top: tuple[str, ...] = ()) -> dict[str, str]:
    """Log ``src`` (without ``skip_top``) once per content hash as the artifacts of a run of its
    own; returns the reference a version stores in ``parts.json``."""
    staged = Path(_stage_dir(src, tmp / f"part-{kind}", skip_top))
    digest = dir_hash(staged)
    found = client.search_runs(
        [exp_id], max_results=1, order_by=["attributes.start_time ASC"],
        filter_string=(f"tags.`{PART_TAG}` = '{kind}' and tags.`{HASH_TAG}` = '{digest}' "
                       "and attributes.status = 'FINISHED'"))
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(exp_id, tags={PART_TAG: kind, HASH_TAG: digest},
                                   run_name=f"{kind}-{digest[:12]}").info.run_id
        try:
            client.log_artifacts(run_id, str(staged), artifact_path=kind)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id)  # FINISHED: only now do later versions reuse it
    return {"kind": kind, "content_hash": digest, "run_id": run_id, "artifact_path": kind}


def _check_parts(adapter_dir: Path, backbone_dir: Path, base_dir: Path) -> None:
    for label, d in (("adapter", adapter_dir), ("backbone", backbone_dir), ("base", base_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{label} directory not found: {d}")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (not an adapter directory)")


def _existing_result(client: MlflowClient, condition: str, existing, judge: Any,
                     challenger: Mapping[str, Path]) -> RegistrationResult:
    """The idempotent hit: report the version; gate it only if it never was (registered, then
    interrupted before the gate)."""
    name = model_name(condition)
    version = str(existing.version)
    if existing.tags.get("gate") is None:
        _, reason, _ = _decide(client, name, existing, judge, challenger)
        existing = client.get_model_version(name, version)
        decision = existing.tags.get("gate", "unchanged")
    else:
        decision, reason = "unchanged", f"already registered as v{version}"
    return RegistrationResult(condition, name, version, False, decision, reason,
                              alias_version(client, name, CHAMPION), existing.run_id,
                              dict(existing.tags))


def experiment_id(client: MlflowClient) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        # artifacts beside the sqlite file, not in whatever the current directory is
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def _log_run_record(condition: str, adapter_dir: Path, backbone_dir: Path, base_dir: Path,
                    gate: Mapping[str, Any], metrics: Mapping[str, float],
                    tags: Mapping[str, str]) -> None:
    """The registering run's params (inputs, gate, adapter config), metrics and tags."""
    adapter_cfg = {}
    if (adapter_dir / ADAPTER_CONFIG).is_file():
        adapter_cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    params = {"condition": condition, "adapter_dir": str(adapter_dir),
              "backbone_dir": str(backbone_dir), "base_dir": str(base_dir),
              **{f"gate.{k}": v for k, v in gate.items()},
              **{f"adapter.{k}": v for k, v in adapter_cfg.items()
                 if isinstance(v, (str, int, float, bool)) and k != "base_hash"}}
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
    if metrics:
        mlflow.log_metrics(dict(metrics))
    mlflow.set_tags(dict(tags))


def _log_dataset_input(condition: str, dataset_path: Path, dataset_hash: str) -> None:
    """The condition's data set as the run's training input, its digest the DVC hash."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "" and "file" schemes both resolve to the local source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(dataset_path.resolve().as_uri())
    mlflow.log_input(MetaDataset(source, name=f"prepared-{condition}", digest=dataset_hash[:36]),
                     context="training", tags={"dataset_hash": dataset_hash})


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _stage_dir(src: Path, dst: Path, skip_top: tuple[str, ...] = ()) -> str:
    """A hard-linked (or copied) view of ``src`` without the top-level names in ``skip_top``."""
    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(directory) == src and n in skip_top]
    shutil.copytree(src, dst, copy_function=_link_or_copy, ignore=ignore)
    return str(dst)


def pip_requirements() -> list[str]:
    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={dist_version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs
