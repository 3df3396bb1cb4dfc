"""Register one adapter as a version of ``ctrlora-<condition>`` and apply the gate.

A version is tied to the data it was trained on (``dataset_hash``: the hash DVC records in
``dvc.lock`` for ``data/prepared/conditions/<condition>``), to its base (``base_hash``), to its own
file (``adapter_hash``: sha256 of ``adapter_model.safetensors``) and to the code (``git_commit``).
Registration is idempotent: the same adapter hash and dataset hash return the existing version
and create nothing.

The version's model is the pyfunc of :mod:`pipelines.pyfunc`, logged as code
(:mod:`pipelines.pyfunc_model`; nothing is pickled) with the backbone, base ControlNet and adapter
directories as artifacts. No ``code_paths`` are copied: the loading process imports the installed
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
from pipelines.gate import flatten_metrics, gate_config, metric_tags
from pipelines.registry import (CHAMPION, CHALLENGER, alias_version, apply_gate, find_version,
                                model_name)
from pipelines.settings import PREPARED_CONDITIONS, REPO_ROOT

# The models-from-code file; referred to by path (importing it would set a model as a side effect).
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
EXPERIMENT = "ctrlora-register"   # overridden by MLFLOW_EXPERIMENT_NAME
# Pinned into every version's requirements, so a loading environment can be rebuilt.
REQUIREMENTS = ("ctrlora-dental", "torch", "diffusers", "peft", "transformers", "safetensors",
                "accelerate", "pillow", "numpy", "pandas", "mlflow")


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


def register_adapter(condition: str, adapter_dir: str | Path, *, dataset_hash: str, base_hash: str,
                     backbone_dir: str | Path, base_dir: str | Path,
                     metrics: Mapping[str, Any] | None, git_commit: str,
                     gate: Mapping[str, Any] | None = None,
                     dataset_path: str | Path | None = None) -> RegistrationResult:
    """Register ``adapter_dir`` as a version of ``ctrlora-<condition>`` and apply the gate.

    Idempotent: a version with the same ``adapter_hash`` and ``dataset_hash`` is returned as is
    (nothing is created; its gate decision is not re-taken, so a rollback is not undone by
    running the pipeline again). ``dataset_path``: where the data set lives, recorded as the
    MLflow input's source (default ``data/prepared/conditions/<condition>`` of the repo).
    """
    adapter_dir, backbone_dir, base_dir = Path(adapter_dir), Path(backbone_dir), Path(base_dir)
    _check_parts(adapter_dir, backbone_dir, base_dir)
    gate = gate_config(gate)
    adapter_hash = sha256_file(adapter_dir / ADAPTER_WEIGHTS)
    name = model_name(condition)
    client = MlflowClient()

    existing = find_version(condition, adapter_hash, dataset_hash)
    if existing is not None:
        return _existing_result(client, condition, existing, gate)

    flat = flatten_metrics(metrics)
    tags = {"condition": condition, "dataset_hash": dataset_hash, "base_hash": base_hash,
            "adapter_hash": adapter_hash, "git_commit": git_commit, **metric_tags(flat)}
    dataset_path = Path(dataset_path or REPO_ROOT / PREPARED_CONDITIONS / condition)
    with tempfile.TemporaryDirectory(prefix="ctrlora-register-") as tmp, \
            mlflow.start_run(experiment_id=_experiment_id(client),
                             run_name=f"register-{condition}") as run:
        _log_run_record(condition, adapter_dir, backbone_dir, base_dir, gate, flat, tags)
        _log_dataset_input(condition, dataset_path, dataset_hash)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE),
            artifacts=_stage_artifacts(Path(tmp), backbone_dir, base_dir, adapter_dir),
            pip_requirements=_pip_requirements(),
            metadata={"condition": condition, "dataset_hash": dataset_hash,
                      "adapter_hash": adapter_hash, "base_hash": base_hash},
        )
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    client.update_registered_model(name, description=f"CtrLoRA adapter for the '{condition}' condition")
    promoted, reason, _ = apply_gate(client, name, client.get_model_version(name, str(mv.version)), gate)
    mv = client.get_model_version(name, str(mv.version))
    return RegistrationResult(condition, name, str(mv.version), True,
                              CHAMPION if promoted else CHALLENGER, reason,
                              alias_version(client, name, CHAMPION), run.info.run_id, dict(mv.tags))


def _check_parts(adapter_dir: Path, backbone_dir: Path, base_dir: Path) -> None:
    for label, d in (("adapter", adapter_dir), ("backbone", backbone_dir), ("base", base_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{label} directory not found: {d}")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (not an adapter directory)")


def _existing_result(client: MlflowClient, condition: str, existing,
                     gate: Mapping[str, Any]) -> RegistrationResult:
    """The idempotent hit: report the version; gate it only if it never was (registered, then
    interrupted before the gate)."""
    name = model_name(condition)
    version = str(existing.version)
    if existing.tags.get("gate") is None:
        _, reason, _ = apply_gate(client, name, existing, gate)
        existing = client.get_model_version(name, version)
        decision = existing.tags.get("gate", "unchanged")
    else:
        decision, reason = "unchanged", f"already registered as v{version}"
    return RegistrationResult(condition, name, version, False, decision, reason,
                              alias_version(client, name, CHAMPION), existing.run_id,
                              dict(existing.tags))


def _experiment_id(client: MlflowClient) -> str:
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


def _stage_artifacts(tmp: Path, backbone_dir: Path, base_dir: Path,
                     adapter_dir: Path) -> dict[str, str]:
    """The pyfunc's artifacts; the base without its base-condition adapters (each of those is
    a version of its own model)."""
    return {"backbone": _stage_dir(backbone_dir, tmp / "backbone"),
            "base": _stage_dir(base_dir, tmp / "base", skip_top=("adapters",)),
            "adapter": _stage_dir(adapter_dir, tmp / "adapter")}


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={dist_version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs
