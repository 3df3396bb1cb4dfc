"""MLflow model registry for CtrLoRA adapters: register, gate, promote, roll back, resolve.

Every adapter becomes a version of the registered model ``ctrlora-<condition>``. A version is
tied to the data it was trained on (``dataset_hash``: the hash DVC records in ``dvc.lock`` for
``data/prepared/conditions/<condition>``), to its base (``base_hash``), to its own file
(``adapter_hash``: sha256 of ``adapter_model.safetensors``) and to the code (``git_commit``).

Aliases carry the roles:

* ``champion`` -- the version people and ``ctrlora generate models:/ctrlora-<c>@champion`` use.
  It moves only through :func:`promote` (gated unless ``force``); every move is appended to the
  registered model's ``champion_history`` tag, which :func:`rollback` walks back.
* ``challenger`` -- the latest version that did not pass the gate; its ``gate_reason`` tag says
  why, with the numbers.

The tracking URI comes from the environment (``MLFLOW_TRACKING_URI``; :mod:`pipelines.settings`
defaults it to the sqlite store in the repo). Registration is idempotent: the same adapter hash
and dataset hash return the existing version and create nothing.

The registered model is a pyfunc (:class:`CtrLoRAPyfunc`) whose artifacts are the backbone
directory, the base ControlNet directory and the adapter directory. The wrapper class is pickled
*by reference* (``pipelines.registry.CtrLoRAPyfunc``), not by value, and no ``code_paths`` are
copied: the loading process imports the installed ``ctrlora-dental`` package (editable in
``.venv``), so ``ctrlora``/``pipelines`` are imported exactly once, from one place. The
``git_commit`` tag says which code produced the version. (``code_paths`` would put a frozen
snapshot of ``ctrlora/`` first on ``sys.path``; in a process that has already imported
``ctrlora`` -- e.g. ``ctrlora generate`` -- the snapshot and the installed package would mix.)
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pipelines  # noqa: F401  (applies tool defaults before MLflow is imported)

import mlflow
import mlflow.pyfunc
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ctrlora.data.files import sha256_file

MODEL_PREFIX = "ctrlora-"
EXPERIMENT = "ctrlora-register"
CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_GATE: dict[str, Any] = {"metric": "fidelity", "mode": "max", "min_delta": 0.0}
PREPARED_CONDITIONS = "data/prepared/conditions"


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed (missing model/version/alias, bad input)."""


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


# --------------------------------------------------------------------------- helpers

def model_name(condition: str) -> str:
    return f"{MODEL_PREFIX}{condition}"


def _norm(path: str) -> str:
    p = str(path).replace("\\", "/").strip()
    while p.startswith("./"):
        p = p[2:]
    return p.rstrip("/")


def lock_hash(repo_root: str | Path, path: str) -> str:
    """The hash DVC recorded in ``dvc.lock`` for ``path`` (an out of some stage; else a dep)."""
    lock_file = Path(repo_root) / "dvc.lock"
    if not lock_file.is_file():
        raise FileNotFoundError(f"{lock_file}: no dvc.lock (run `dvc repro` first)")
    lock = yaml.safe_load(lock_file.read_text()) or {}
    stages = lock.get("stages") or {}
    want = _norm(path)
    found_in_deps = None
    for _stage, entry in stages.items():
        for kind in ("outs", "deps"):
            for item in entry.get(kind) or []:
                if _norm(item.get("path", "")) != want:
                    continue
                value = item.get("md5") or item.get(item.get("hash", "md5")) or item.get("etag")
                if not value:
                    continue
                if kind == "outs":
                    return str(value)
                found_in_deps = found_in_deps or str(value)
    if found_in_deps:
        return found_in_deps
    raise KeyError(f"{lock_file}: no stage records {want!r} (outs or deps); "
                   f"stages present: {sorted(stages)}")


def dataset_hash_from_lock(repo_root: str | Path, condition: str) -> str:
    """DVC's hash of ``data/prepared/conditions/<condition>`` as recorded in ``dvc.lock``."""
    return lock_hash(repo_root, f"{PREPARED_CONDITIONS}/{condition}")


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def _client() -> MlflowClient:
    return MlflowClient()


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


def _versions(client: MlflowClient, name: str) -> list:
    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _history(client: MlflowClient, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _stage_dir(src: Path, dst: Path, skip_top: tuple[str, ...] = ()) -> Path:
    """A hard-linked (or copied) view of ``src`` without the top-level names in ``skip_top``."""
    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(directory) == src and n in skip_top]
    shutil.copytree(src, dst, copy_function=_link_or_copy, ignore=ignore)
    return dst


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version
    reqs = []
    for dist in ("ctrlora-dental", "torch", "diffusers", "peft", "transformers", "safetensors",
                 "accelerate", "pillow", "numpy", "pandas", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


# --------------------------------------------------------------------------- pyfunc

def _decode_image(value: Any):
    from PIL import Image
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str):
        value = base64.b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value))).convert("RGB")
    raise TypeError(f"condition_image: expected PNG bytes or base64 str, got {type(value).__name__}")


def _cell(row: Mapping, key: str, default: Any) -> Any:
    value = row.get(key, default)
    try:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return default
    except TypeError:
        pass
    return value


class CtrLoRAPyfunc(mlflow.pyfunc.PythonModel):
    """backbone + base ControlNet + one condition adapter → images.

    Input: a pandas DataFrame with ``condition_image`` (PNG bytes or base64 str) and optional
    ``prompt`` (""), ``weight`` (1.0), ``seed`` (0), ``steps`` (20), ``guidance_scale`` (7.5).
    Output: a DataFrame with one column ``image`` holding PNG bytes, one row per input row.
    """

    def load_context(self, context) -> None:
        from ctrlora.pipeline import CtrLoRAPipeline

        adapter = Path(context.artifacts["adapter"])
        self.condition = json.loads((adapter / ADAPTER_CONFIG).read_text())["condition"]
        self.pipe = CtrLoRAPipeline.from_pretrained_parts(
            context.artifacts["backbone"], context.artifacts["base"], {self.condition: str(adapter)})

    # ``predict`` is attached below the class body: MLflow inspects a ``predict`` defined in the
    # body for type hints and warns on every import when there are none (inputs here are
    # untyped on purpose: PNG bytes or base64 text).


def _predict(self, context, model_input, params=None):
    import pandas as pd

    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "condition_image" not in frame.columns:
        raise ValueError(f"model input needs a 'condition_image' column; got {list(frame.columns)}")
    params = dict(params or {})
    images = []
    for row in frame.to_dict("records"):
        image = _decode_image(row["condition_image"])
        out = self.pipe(
            str(_cell(row, "prompt", params.get("prompt", ""))),
            conditions={self.condition: (image, float(_cell(row, "weight", 1.0)))},
            num_inference_steps=int(_cell(row, "steps", params.get("steps", 20))),
            guidance_scale=float(_cell(row, "guidance_scale", params.get("guidance_scale", 7.5))),
            seed=int(_cell(row, "seed", 0)),
            output_type="pil",
            progress=False,
        )
        buf = io.BytesIO()
        out.images[0].save(buf, format="PNG")
        images.append(buf.getvalue())
    return pd.DataFrame({"image": images})


CtrLoRAPyfunc.predict = _predict


# --------------------------------------------------------------------------- gate / promotion

def _metric_of(version, metric: str) -> float | None:
    raw = version.tags.get(f"metric.{metric}")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def evaluate_gate(gate: Mapping[str, Any], new: float | None, champion: float | None,
                  champion_version: str | None) -> tuple[bool, str]:
    """(passes, reason with the numbers). ``mode`` max: new >= champion + min_delta."""
    metric = gate.get("metric", DEFAULT_GATE["metric"])
    mode = gate.get("mode", DEFAULT_GATE["mode"])
    delta = float(gate.get("min_delta", DEFAULT_GATE["min_delta"]))
    if mode not in ("max", "min"):
        raise ValueError(f"gate mode must be 'max' or 'min', got {mode!r}")
    if new is None:
        kept = f"champion v{champion_version} kept" if champion_version else "no champion set"
        return False, f"{metric} missing on this version (not evaluated?); {kept}"
    if champion_version is None:
        return True, f"no champion yet ({metric} {new:.6g})"
    if champion is None:
        return False, (f"champion v{champion_version} has no {metric} to compare with "
                       f"({metric}={new:.6g}); promote with force=True to replace it")
    if mode == "max":
        ok = new >= champion + delta
        sign = ">=" if ok else "<"
        bound = f"champion v{champion_version} {champion:.6g} + min_delta {delta:g}"
    else:
        ok = new <= champion - delta
        sign = "<=" if ok else ">"
        bound = f"champion v{champion_version} {champion:.6g} - min_delta {delta:g}"
    return ok, f"{metric} {new:.6g} {sign} {bound} (mode {mode})"


def _set_champion(client: MlflowClient, name: str, version: str) -> str | None:
    previous = _alias_version(client, name, CHAMPION)
    history = _history(client, name)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)  # the alias was moved outside this module; keep it walkable
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    if _alias_version(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return previous


def _require_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} has no version {version}") from exc


def _gate_and_mark(client: MlflowClient, name: str, mv, gate: Mapping[str, Any],
                   force: bool = False) -> tuple[bool, str, str | None]:
    champ_v = _alias_version(client, name, CHAMPION)
    version = str(mv.version)
    if champ_v == version:
        return True, f"v{version} already champion", champ_v
    metric = gate.get("metric", DEFAULT_GATE["metric"])
    champ_metric = _metric_of(client.get_model_version(name, champ_v), metric) if champ_v else None
    ok, reason = evaluate_gate(gate, _metric_of(mv, metric), champ_metric, champ_v)
    if force and not ok:
        ok, reason = True, f"forced: {reason}"
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if ok:
        previous = _set_champion(client, name, version)
        client.set_model_version_tag(name, version, "gate", CHAMPION)
        client.set_model_version_tag(name, version, "gate_reason", reason)
        client.set_model_version_tag(name, version, "promoted_at", when)
        return True, reason, previous
    client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, "gate", CHALLENGER)
    client.set_model_version_tag(name, version, "gate_reason", reason)
    return False, reason, champ_v


def promote(condition: str, version: str | int, force: bool = False,
            gate: Mapping[str, Any] | None = None) -> PromotionResult:
    """Move ``champion`` to ``version`` if it passes the gate against the current champion
    (or unconditionally with ``force``). A refused version becomes ``challenger``."""
    client = _client()
    name = model_name(condition)
    mv = _require_version(client, name, str(version))
    ok, reason, previous = _gate_and_mark(client, name, mv, dict(DEFAULT_GATE, **(gate or {})), force)
    return PromotionResult(condition, str(version), ok, previous, reason)


def rollback(condition: str) -> PromotionResult:
    """champion → the previous champion (walks ``champion_history`` back one step)."""
    client = _client()
    name = model_name(condition)
    try:
        history = _history(client, name)
    except MlflowException as exc:
        raise RegistryError(f"no registered model {name}") from exc
    current = _alias_version(client, name, CHAMPION)
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
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    client.set_model_version_tag(name, current, "gate", "rolled_back")
    client.set_model_version_tag(name, current, "rolled_back_at", when)
    return PromotionResult(condition, target, True, current, f"rolled back v{current} → v{target}")


def list_models() -> list[dict[str, Any]]:
    """One row per version of every ``ctrlora-*`` model: version, aliases, key tags, metrics."""
    client = _client()
    rows = []
    for rm in client.search_registered_models(f"name LIKE '{MODEL_PREFIX}%'"):
        aliases: dict[str, list[str]] = {}
        for alias, v in (getattr(rm, "aliases", None) or {}).items():
            aliases.setdefault(str(v), []).append(alias)
        for mv in sorted(_versions(client, rm.name), key=lambda v: int(v.version)):
            tags = dict(mv.tags)
            rows.append({
                "model": rm.name,
                "condition": rm.name[len(MODEL_PREFIX):],
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "dataset_hash": tags.get("dataset_hash"),
                "adapter_hash": tags.get("adapter_hash"),
                "base_hash": tags.get("base_hash"),
                "git_commit": tags.get("git_commit"),
                "gate": tags.get("gate"),
                "gate_reason": tags.get("gate_reason"),
                "metrics": {k[len("metric."):]: float(v) for k, v in tags.items()
                            if k.startswith("metric.")},
            })
    return rows


# --------------------------------------------------------------------------- registration

def find_version(condition: str, adapter_hash: str, dataset_hash: str):
    """The existing version with this adapter hash and dataset hash, or None."""
    client = _client()
    for mv in _versions(client, model_name(condition)):
        if mv.tags.get("adapter_hash") == adapter_hash and mv.tags.get("dataset_hash") == dataset_hash:
            return mv
    return None


def register_adapter(condition: str, adapter_dir: str | Path, *, dataset_hash: str, base_hash: str,
                     backbone_dir: str | Path, base_dir: str | Path,
                     metrics: Mapping[str, Any] | None, git_commit: str,
                     gate: Mapping[str, Any] | None = None,
                     dataset_path: str | Path | None = None) -> RegistrationResult:
    """Register ``adapter_dir`` as a version of ``ctrlora-<condition>`` and apply the gate.

    Idempotent: a version with the same ``adapter_hash`` and ``dataset_hash`` is returned as is
    (nothing is created; its gate decision is not re-taken, so a rollback is not undone by
    running the pipeline again). ``dataset_path``: where the data set lives, recorded as the
    MLflow input's source (default ``data/prepared/conditions/<condition>``).
    """
    adapter_dir, backbone_dir, base_dir = Path(adapter_dir), Path(backbone_dir), Path(base_dir)
    for label, d in (("adapter", adapter_dir), ("backbone", backbone_dir), ("base", base_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{label} directory not found: {d}")
    weights = adapter_dir / ADAPTER_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_FILE} (not an adapter directory)")
    gate = dict(DEFAULT_GATE, **(gate or {}))
    adapter_hash = sha256_file(weights)
    name = model_name(condition)
    client = _client()

    existing = find_version(condition, adapter_hash, dataset_hash)
    if existing is not None:
        version = str(existing.version)
        if existing.tags.get("gate") is None:  # registered, then interrupted before the gate
            _, reason, _ = _gate_and_mark(client, name, existing, gate)
            existing = client.get_model_version(name, version)
            decision = existing.tags.get("gate", "unchanged")
        else:
            decision, reason = "unchanged", f"already registered as v{version}"
        return RegistrationResult(condition, name, version, False, decision, reason,
                                  _alias_version(client, name, CHAMPION), existing.run_id,
                                  dict(existing.tags))

    flat = _flatten_metrics(metrics or {})
    tags = {
        "condition": condition,
        "dataset_hash": dataset_hash,
        "base_hash": base_hash,
        "adapter_hash": adapter_hash,
        "git_commit": git_commit,
        **{f"metric.{k}": repr(v) for k, v in flat.items()},
    }
    adapter_cfg = {}
    if (adapter_dir / ADAPTER_CONFIG).is_file():
        adapter_cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())

    exp_id = _experiment_id(client)
    with tempfile.TemporaryDirectory(prefix="ctrlora-register-") as tmp, \
            mlflow.start_run(experiment_id=exp_id, run_name=f"register-{condition}") as run:
        params = {"condition": condition, "adapter_dir": str(adapter_dir),
                  "backbone_dir": str(backbone_dir), "base_dir": str(base_dir),
                  **{f"gate.{k}": v for k, v in gate.items()},
                  **{f"adapter.{k}": v for k, v in adapter_cfg.items()
                     if isinstance(v, (str, int, float, bool)) and k != "base_hash"}}
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        if flat:
            mlflow.log_metrics(flat)
        mlflow.set_tags(tags)

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        with warnings.catch_warnings():  # "" and "file" schemes both resolve to the local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(
                Path(dataset_path or f"{PREPARED_CONDITIONS}/{condition}").resolve().as_uri())
        mlflow.log_input(MetaDataset(source, name=f"prepared-{condition}", digest=dataset_hash[:36]),
                         context="training", tags={"dataset_hash": dataset_hash})

        staged = Path(tmp)
        artifacts = {
            "backbone": str(_stage_dir(backbone_dir, staged / "backbone")),
            "base": str(_stage_dir(base_dir, staged / "base", skip_top=("adapters",))),
            "adapter": str(_stage_dir(adapter_dir, staged / "adapter")),
        }
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CtrLoRAPyfunc(), artifacts=artifacts,
            pip_requirements=_pip_requirements(),
            metadata={"condition": condition, "dataset_hash": dataset_hash,
                      "adapter_hash": adapter_hash, "base_hash": base_hash},
        )
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
        run_id = run.info.run_id
    client.update_registered_model(name, description=f"CtrLoRA adapter for the '{condition}' condition")
    promoted, reason, _ = _gate_and_mark(client, name, client.get_model_version(name, str(mv.version)), gate)
    mv = client.get_model_version(name, str(mv.version))
    return RegistrationResult(condition, name, str(mv.version), True,
                              CHAMPION if promoted else CHALLENGER, reason,
                              _alias_version(client, name, CHAMPION), run_id, dict(mv.tags))


# --------------------------------------------------------------------------- resolve for generate

def resolve_adapter_uri(uri: str, dst_path: str | Path | None = None) -> ResolvedModel:
    """``models:/ctrlora-<c>@alias`` (or ``models:/ctrlora-<c>/<version>``) → local directories
    of backbone, base and adapter (the model's artifacts are downloaded to ``dst_path`` or a
    new temporary directory)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a models:/ URI: {uri!r}")
    ref = uri[len("models:/"):]
    client = _client()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r}") from exc
    elif "/" in ref:
        name, version = ref.split("/", 1)
        mv = _require_version(client, name, version)
    else:
        raise ValueError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    if dst_path is None:
        dst_path = tempfile.mkdtemp(prefix=f"{name}-v{mv.version}-")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                     dst_path=str(dst_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    arts = mlmodel["flavors"]["python_function"].get("artifacts") or {}
    missing = [k for k in ("backbone", "base", "adapter") if k not in arts]
    if missing:
        raise RegistryError(f"{uri}: not a CtrLoRA model (artifacts missing: {missing})")
    paths = {k: local / arts[k]["path"] for k in ("backbone", "base", "adapter")}
    condition = mv.tags.get("condition") or name[len(MODEL_PREFIX):]
    return ResolvedModel(name, str(mv.version), condition, paths["backbone"], paths["base"],
                         paths["adapter"], local)
