"""The MLOps shell around :mod:`ctrlora`: DVC stage entry points, Prefect flows, MLflow registry."""
from pipelines import settings as _settings

_settings.apply()
