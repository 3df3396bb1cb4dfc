#!/usr/bin/env bash
# Headless Chromium for the studio's browser test (tests/pipelines/test_studio.py): Debian's
# package, installed once as root with apt-get; run by `make test` only, so `make repro` never waits
# for it. Without root or apt-get the test is skipped and says why. A present browser costs one lookup.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[browser] installing chromium (Debian package) for the studio's browser test"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
      echo "[browser] chromium could not be installed; the studio's browser test will be skipped"
  else
    echo "[browser] no chromium (install it as root: apt-get install chromium); the studio's browser test will be skipped"
  fi
fi
