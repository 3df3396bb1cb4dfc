"""Facts of the MLOps shell, each stated once: the repo root, the params file (read by the
project's one reader, :mod:`ctrlora.params`), where the graph's artefacts lie (params.yaml
``paths``, also read by dvc.yaml), and the tool defaults.

Every process of the shell (DVC stage entries, Prefect flows, the registry, the tests) imports
:mod:`pipelines`, which applies the tool defaults with ``os.environ.setdefault`` — so a value the
user exported (an MLflow server, a Prefect server) always wins.

DVC keeps its own settings in ``.dvc/config`` (committed): ``core.analytics = false`` and
``core.site_cache_dir = .dvc/site_cache`` (inside the repo).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ctrlora import params as _params
from ctrlora.params import PARAMS_ENV, PARAMS_FILE  # noqa: F401  ($CTRLORA_PARAMS names another file: tests, experiments)

REPO_ROOT = Path(__file__).resolve().parent.parent


def params_path() -> Path:
    """The params file the stage entries read: ``$CTRLORA_PARAMS``, else the repo's params.yaml
    (never the working directory's)."""
    return Path(os.environ.get(PARAMS_ENV) or REPO_ROOT / PARAMS_FILE)


def read_params(*sections: str, path: Path | None = None) -> Any:
    """One section of the params file (:func:`params_path`), or a dict of several keyed by
    section (:func:`ctrlora.params.read_sections`: a missing section is a KeyError naming the
    file and the section)."""
    return _params.read_sections(*sections, path=Path(path or params_path()))


def load_params(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The whole params file of the repo at ``root`` (``{}`` when it has none)."""
    path = Path(root) / PARAMS_FILE
    return _params.load_params(path) if path.is_file() else {}


# Where the graph's artefacts lie, relative to the repo root: params.yaml ``paths`` of this
# checkout. Stage entries resolve the section at run time instead (pipelines.stages.common.artefact_paths),
# so that $CTRLORA_PARAMS can point them elsewhere.
PATHS: dict[str, Any] = read_params("paths", path=REPO_ROOT / PARAMS_FILE)
INCOMING = PATHS["incoming"]
PREPARED_CONDITIONS = f"{PATHS['prepared']}/conditions"   # one folder per condition: its data set
BACKBONE_DIR = PATHS["backbone"]
BASE_DIR = PATHS["base"]
BASE_ADAPTERS = "adapters"  # train_base writes each base condition's adapter to <base>/adapters/<c>
# Adapter folders <root>/<condition>/; a later root registers later (its versions are newer).
ADAPTER_ROOTS = (f"{BASE_DIR}/{BASE_ADAPTERS}", PATHS["adapters"])
METRICS_FILE = PATHS["metrics"]["evaluate"]
REPRO_TIMES = PATHS["repro_times"]


def defaults(root: Path = REPO_ROOT) -> dict[str, str]:
    return {
        # MLflow: a sqlite store inside the repo (the file store is refused by recent MLflow).
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # DVC / generic telemetry off.
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        # Prefect 3: its temporary local server can take > 20 s to start on a loaded 2-core box.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(root / ".prefect"),
        # Nothing ever reaches a model hub.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def apply(root: Path = REPO_ROOT) -> None:
    for key, value in defaults(root).items():
        os.environ.setdefault(key, value)
