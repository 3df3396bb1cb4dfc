"""The MLflow model registry of CtrLoRA adapters: versions, aliases, promotion, rollback, lookup.

Every adapter is a version of the registered model ``ctrlora-<condition>``
(:mod:`pipelines.registry.registration` creates them). Aliases carry the roles:

* ``champion`` -- the version people and ``ctrlora-ops generate`` with
  ``models:/ctrlora-<c>@champion`` use. It moves only on a paired comparison with the champion
  on the frozen benchmark (registration; :func:`pipelines.registry.registration.promote`), or by
  a forced promotion that records its reason; every move is appended to the registered model's
  ``champion_history`` tag, which :func:`rollback` walks back.
* ``challenger`` -- the latest version that did not pass the gate; its ``gate_reason`` tag says
  why, with the numbers.

A version's model holds its adapter and ``parts.json``, a reference to the backbone and the base
ControlNet it needs. Each of those is logged once per content hash (:func:`dir_hash`) as the
artifacts of a run of its own (tags ``ctrlora.part`` and ``ctrlora.content_hash``) and shared by
every version that uses it; :func:`fetch_part` downloads one into a local cache keyed by that
hash and checks the hash before handing it out.

The tracking URI comes from the environment (``MLFLOW_TRACKING_URI``; :mod:`pipelines.settings`
defaults it to the sqlite store in the repo).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.registry.gate import metrics_from_tags

MODEL_PREFIX = "ctrlora-"
CHAMPION = "champion"
CHALLENGER = "challenger"
ROLLED_BACK = "rolled_back"
HISTORY_TAG = "champion_history"
ARTIFACTS = ("backbone", "base", "adapter")  # what a resolved version brings
PARTS = ("backbone", "base")                 # logged once per content hash, referenced by versions
PARTS_FILE = "parts.json"                    # a version's reference to its parts
ADAPTERS_KEY = "adapters"                    # parts.json of a combination: {condition: reference}
PART_TAG, HASH_TAG = "ctrlora.part", "ctrlora.content_hash"
PARTS_CACHE_ENV = "CTRLORA_PARTS_CACHE"      # where fetched parts are kept (default: temp dir)


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed (missing model/version/alias, bad input)."""


@dataclass
class PromotionResult:
    condition: str
    version: str
    promoted: bool
    previous: str | None
    reason: str


@dataclass
class ResolvedModel:
    model_name: str
    version: str
    condition: str
    backbone: Path
    base: Path
    adapter: Path
    local_dir: Path


def dir_hash(directory: str | Path) -> str:
    """sha256 over every file of ``directory``: its relative path and the sha256 of its bytes,
    in sorted path order (names and contents, not timestamps)."""
    root = Path(directory)
    outer = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        inner = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{path.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def _parts_cache() -> Path:
    return Path(os.environ.get(PARTS_CACHE_ENV) or Path(tempfile.gettempdir()) / "ctrlora-parts")


def fetch_part(ref: Mapping[str, str]) -> Path:
    """The local directory of a part reference ``{kind, content_hash, run_id, artifact_path}``:
    from the cache when a copy with that hash is there, else downloaded from the run's
    artifacts and checked against the hash."""
    kind, digest = ref["kind"], ref["content_hash"]
    target = _parts_cache() / kind / digest
    if target.is_dir() and dir_hash(target) == digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(run_id=ref["run_id"],
                                                       artifact_path=ref["artifact_path"],
                                                       dst_path=str(tmp)))
        actual = dir_hash(got)
        if actual != digest:
            raise RegistryError(f"{kind} of run {ref['run_id']}: content hash {actual[:12]} does not "
                                f"match the reference {digest[:12]} (artifact store changed?)")
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(got, target)
        except OSError:  # another process put a copy there first
            if not (target.is_dir() and dir_hash(target) == digest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_parts(parts_file: str | Path) -> dict[str, Path]:
    """``{"backbone": dir, "base": dir}`` of a version's ``parts.json``."""
    refs = json.loads(Path(parts_file).read_text())
    missing = [k for k in PARTS if k not in refs]
    if missing:
        raise RegistryError(f"{parts_file}: no reference for {missing}")
    return {k: fetch_part(refs[k]) for k in PARTS}


def fetch_adapters(parts_file: str | Path) -> dict[str, Path]:
    """``{condition: dir}`` of the adapters a version's ``parts.json`` references (a combination
    of conditions, :mod:`pipelines.registry.combination`); ``{}`` for a one-condition version,
    which holds its adapter itself."""
    refs = json.loads(Path(parts_file).read_text()).get(ADAPTERS_KEY) or {}
    return {str(c): fetch_part(ref) for c, ref in sorted(refs.items())}


def model_name(condition: str) -> str:
    return f"{MODEL_PREFIX}{condition}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def versions(client: MlflowClient, name: str) -> list:
    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def require_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} has no version {version}") from exc


def _history(client: MlflowClient, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def _set_champion(client: MlflowClient, name: str, version: str) -> str | None:
    """Move ``champion`` to ``version``, recording the move; returns the previous champion."""
    previous = alias_version(client, name, CHAMPION)
    history = _history(client, name)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)  # the alias was moved outside this module; keep it walkable
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    if alias_version(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return previous


def _tag_version(client: MlflowClient, name: str, version: str, **tags: str) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def record_decision(client: MlflowClient, name: str, version: str, promoted: bool, reason: str,
                    tags: Mapping[str, str] | None = None) -> str | None:
    """Apply a gate decision taken elsewhere (the paired benchmark comparison): ``version``
    becomes ``champion`` (promoted) or ``challenger``, and carries the decision and ``tags``.
    Returns the champion after the call."""
    version = str(version)
    extra = {k: str(v) for k, v in (tags or {}).items()}
    if promoted:
        _set_champion(client, name, version)
        _tag_version(client, name, version, gate=CHAMPION, gate_reason=reason, promoted_at=_now(),
                     **extra)
        return version
    if alias_version(client, name, CHAMPION) != version:
        client.set_registered_model_alias(name, CHALLENGER, version)
    _tag_version(client, name, version, gate=CHALLENGER, gate_reason=reason, **extra)
    return alias_version(client, name, CHAMPION)


def rollback(condition: str) -> PromotionResult:
    """champion → the previous champion (walks ``champion_history`` back one step)."""
    return rollback_model(model_name(condition), condition)


def rollback_model(name: str, label: str | None = None) -> PromotionResult:
    """:func:`rollback` of any registered model by its name: a ``ctrlora-<c>`` adapter model or a
    ``ctrlora+<c1>+<c2>...`` combination (whose ``champion`` moves through the same history).
    ``label`` is what the result names (default: the model name)."""
    client = MlflowClient()
    try:
        history = _history(client, name)
    except MlflowException as exc:
        raise RegistryError(f"no registered model {name}") from exc
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    if not history or history[-1] != current:
        history.append(current)
    if len(history) < 2:
        raise RegistryError(f"{name}: champion v{current} has no previous champion to roll back to")
    history.pop()
    target = history[-1]
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    _tag_version(client, name, current, gate=ROLLED_BACK, rolled_back_at=_now())
    return PromotionResult(label or name, target, True, current, f"rolled back v{current} → v{target}")


def _version_row(model: str, mv, aliases: list[str]) -> dict[str, Any]:
    tags = dict(mv.tags)
    row = {"kind": "adapter", "model": model, "condition": model[len(MODEL_PREFIX):],
           "version": str(mv.version), "aliases": sorted(aliases)}
    for key in ("dataset_hash", "adapter_hash", "base_hash", "git_commit", "gate", "gate_reason",
                "benchmark_version", "gate_champion_version", "gate_metric", "gate_n_scans",
                "gate_delta", "gate_low", "gate_high", "gate_weight", "recipe", "forced", "forced_reason"):
        row[key] = tags.get(key)
    row["metrics"] = metrics_from_tags(tags)
    return row


def list_models() -> list[dict[str, Any]]:
    """One row per version of every ``ctrlora-*`` model: version, aliases, key tags, metrics."""
    client = MlflowClient()
    rows = []
    for rm in client.search_registered_models(f"name LIKE '{MODEL_PREFIX}%'"):
        aliases: dict[str, list[str]] = {}
        for alias, v in (getattr(rm, "aliases", None) or {}).items():
            aliases.setdefault(str(v), []).append(alias)
        for mv in sorted(versions(client, rm.name), key=lambda v: int(v.version)):
            rows.append(_version_row(rm.name, mv, aliases.get(str(mv.version), [])))
    return rows


def find_version(condition: str, adapter_hash: str, dataset_hash: str, base_hash: str | None = None):
    """The existing version with this adapter hash and dataset hash; else, with ``base_hash``
    given, the one with this adapter hash on this base (the same bytes on the same base are the
    same model, whatever data now lies in the prepared folder: a base condition's adapter is
    rewritten only when the base retrains, ``base_refresh``, so a landing the base waits for
    leaves it as it was); else None."""
    same_bytes = None
    for mv in versions(MlflowClient(), model_name(condition)):
        if mv.tags.get("adapter_hash") != adapter_hash:
            continue
        if mv.tags.get("dataset_hash") == dataset_hash:
            return mv
        if base_hash is not None and mv.tags.get("base_hash") == base_hash and same_bytes is None:
            same_bytes = mv
    return same_bytes


def _version_for_uri(client: MlflowClient, uri: str):
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → (name, model version)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a models:/ URI: {uri!r}")
    ref = uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            return name, client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r}") from exc
    if "/" in ref:
        name, version = ref.split("/", 1)
        return name, require_version(client, name, version)
    raise ValueError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")


def download_version(uri: str, dst_path: str | Path | None = None) -> tuple[str, Any, Path, dict[str, Path]]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → (name, model version, local
    model directory, ``{artifact: local path}``), the model's files downloaded to ``dst_path`` or
    a new temporary directory, which the caller removes; parts are not fetched."""
    client = MlflowClient()
    name, mv = _version_for_uri(client, uri)
    if dst_path is None:
        dst_path = tempfile.mkdtemp(prefix=f"{name}-v{mv.version}-")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                     dst_path=str(dst_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    arts = mlmodel["flavors"]["python_function"].get("artifacts") or {}
    return name, mv, local, {k: local / v["path"] for k, v in arts.items()}


def resolve_adapter_uri(uri: str, dst_path: str | Path | None = None) -> ResolvedModel:
    """``models:/ctrlora-<c>@alias`` (or ``models:/ctrlora-<c>/<version>``) → local directories
    of backbone, base and adapter (the model's artifacts are downloaded to ``dst_path`` or a
    new temporary directory, which the caller removes: :attr:`ResolvedModel.local_dir`)."""
    name, mv, local, paths = download_version(uri, dst_path)
    if "parts" in paths:  # backbone and base stored once, referenced
        if json.loads(paths["parts"].read_text()).get(ADAPTERS_KEY):
            raise RegistryError(f"{uri}: a combination of conditions, not one adapter "
                                "(pipelines.registry.combination.resolve_combination_uri)")
        paths.update(fetch_parts(paths["parts"]))
    missing = [k for k in ARTIFACTS if k not in paths]
    if missing:
        raise RegistryError(f"{uri}: not a CtrLoRA model (artifacts missing: {missing})")
    condition = mv.tags.get("condition") or name[len(MODEL_PREFIX):]
    return ResolvedModel(name, str(mv.version), condition, paths["backbone"], paths["base"],
                         paths["adapter"], local)
