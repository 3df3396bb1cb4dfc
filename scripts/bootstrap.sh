#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: does nothing when .venv already matches pyproject.toml.
# torch is installed first and pinned, so no other requirement can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.installed-$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then exit 0; fi
echo "[bootstrap] setting up $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[ops,studio,dev,downstream,clinic]"   # ops: DVC, Prefect, MLflow (the shell); studio: the web page; downstream: MONAI; clinic: pycocotools
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[bootstrap] done"
