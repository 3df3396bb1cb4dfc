"""The MLOps shell around :mod:`ctrlora`: DVC stage entry points, Prefect flows, MLflow registry."""
import logging

from pipelines import settings as _settings

_settings.apply()

# The library reports progress through ``logging`` (``ctrlora.*``), the shell too (``pipelines.*``):
# show those INFO messages as plain lines on stderr, so they appear in a DVC stage's output, unless
# the host program (pytest, Prefect, a caller) configured logging first. Other libraries stay at
# WARNING (accelerate, for one, logs every checkpoint save and load at INFO).
if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for _name in ("ctrlora", "pipelines"):
        logging.getLogger(_name).setLevel(logging.INFO)
