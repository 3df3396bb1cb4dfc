"""Facts of the MLOps shell, each stated once: the repo root, where the graph's outputs lie, the
params file, and the tool defaults.

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

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"

# Outputs of the DVC graph that the registry step reads, relative to the repo root.
PREPARED_CONDITIONS = "data/prepared/conditions"   # one folder per condition: its data set
BACKBONE_DIR = "models/backbone"
BASE_DIR = "models/base"
# Adapter folders <root>/<condition>/; a later root registers later (its versions are newer).
ADAPTER_ROOTS = ("models/base/adapters", "models/adapters")
METRICS_FILE = "metrics/evaluate.json"


def load_params(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The whole params file of the repo at ``root`` (``{}`` when it has none)."""
    path = Path(root) / PARAMS_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


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
