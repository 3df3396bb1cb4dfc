#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: does nothing when .venv already matches pyproject.toml.
# torch is installed first and pinned, so no other requirement can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.installed-$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
# Headless Chromium for the studio's browser test: Debian's package, installed once (as root, with
# apt-get); elsewhere the test is skipped and says why. A present browser costs one lookup.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing chromium (Debian package) for the studio's browser test"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
      echo "[bootstrap] chromium could not be installed; the studio's browser test will be skipped"
  else
    echo "[bootstrap] no chromium (install it as root: apt-get install chromium); the studio's browser test will be skipped"
  fi
fi
if [ -f "$STAMP" ]; then exit 0; fi
echo "[bootstrap] setting up $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[ops,studio,dev]"   # ops: DVC, Prefect, MLflow (the shell); studio: the web page
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[bootstrap] done"
