#!/usr/bin/env bash
# Load `ctrlora export` output with the CtrLoRA reference code and with ComfyUI-Advanced-ControlNet's
# CtrLoRA loader, and compare their residuals with this project's model
# (tests/models/test_export_loaders.py; scripts/check_export_loaders.py runs the loaders).
#
# Sets up, from scratch and outside this repository, in $CTRLORA_LOADERS_DIR (default /tmp/ext):
#   ctrlora/                      the reference code, pinned commit
#   ComfyUI/                      ComfyUI, pinned commit
#   ComfyUI-Advanced-ControlNet/  pinned commit
#   venv/                         torch 2.13.0 (CPU) + the few packages the loading code imports
# then runs the test with this repository's .venv. Nothing is written into the repository.
#
# Sources come from git clones, or, with CTRLORA_LOADERS_MIRROR=DIR, from bare repositories
# DIR/<owner>+<name>/repo already on this machine (files absent from such a snapshot are skipped).
# Existing folders are reused; delete them to start over.
#
# Usage: bash scripts/check_export_loaders.sh [extra pytest args]
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${CTRLORA_LOADERS_DIR:-/tmp/ext}
MIRROR=${CTRLORA_LOADERS_MIRROR:-}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# folder  owner/name  commit
SOURCES=(
  "ctrlora xyfJASON/ctrlora b4422b40a3d9c6f8878ec2fd423bc2e7dc218ea4"
  "ComfyUI-Advanced-ControlNet Kosinkadink/ComfyUI-Advanced-ControlNet 9e60d8a9c8016c5315063aa7af66b321a0444df7"
  "ComfyUI Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832"
)
# what the loading code needs (the rest of each repository is not used)
declare -A PATHS=(
  [ctrlora]="api.py cldm ldm"
  [ComfyUI-Advanced-ControlNet]="adv_control"
  [ComfyUI]="comfy comfyui_version.py"
)

fail() { echo "check_export_loaders: $*" >&2; exit 1; }

from_mirror() {  # folder owner/name commit
  local dest=$DIR/$1 git_dir=$MIRROR/${2/\//+}/repo
  [ -d "$git_dir" ] || fail "no bare repository at $git_dir (CTRLORA_LOADERS_MIRROR)"
  local head
  head=$(git --git-dir="$git_dir" rev-parse HEAD)
  [ "$head" = "$3" ] || echo "note: $2 snapshot is at $head, pinned $3" >&2
  mkdir -p "$dest.tmp"
  # shellcheck disable=SC2086
  git --git-dir="$git_dir" ls-tree -r HEAD -- ${PATHS[$1]} | while read -r _ type blob path; do
    [ "$type" = blob ] || continue
    mkdir -p "$dest.tmp/$(dirname "$path")"
    git --git-dir="$git_dir" cat-file blob "$blob" > "$dest.tmp/$path" 2>/dev/null \
      || { rm -f "$dest.tmp/$path"; echo "note: $2:$path absent from the snapshot" >&2; }
  done
  mv "$dest.tmp" "$dest"
}

from_clone() {  # folder owner/name commit
  local dest=$DIR/$1
  git clone --quiet --filter=blob:none --no-checkout "https://github.com/$2.git" "$dest.tmp"
  # shellcheck disable=SC2086
  git -C "$dest.tmp" checkout --quiet "$3" -- ${PATHS[$1]}
  mv "$dest.tmp" "$dest"
}

mkdir -p "$DIR"
for entry in "${SOURCES[@]}"; do
  read -r folder repo commit <<< "$entry"
  if [ -d "$DIR/$folder" ]; then
    echo "reusing $DIR/$folder"
    continue
  fi
  rm -rf "$DIR/$folder.tmp"
  echo "getting $repo@${commit:0:12} -> $DIR/$folder"
  if [ -n "$MIRROR" ]; then from_mirror "$folder" "$repo" "$commit"; else from_clone "$folder" "$repo" "$commit"; fi
done

if ! "$DIR/venv/bin/python" -c "import torch, einops, omegaconf, psutil, safetensors, yaml, PIL, tqdm" 2>/dev/null; then
  echo "creating $DIR/venv"
  "$PY" -m venv "$DIR/venv"
  # the CPU torch first, so nothing below pulls another build; no torchvision (see docs/models.md)
  "$DIR/venv/bin/pip" install --quiet torch==2.13.0
  "$DIR/venv/bin/pip" install --quiet numpy==2.4.6 einops==0.8.2 omegaconf==2.4.0 pillow==13.0.0 \
    safetensors==0.8.0 psutil==7.2.2 PyYAML==6.0.4 tqdm==4.70.1
fi

cd "$REPO_ROOT"
[ -x .venv/bin/python ] || fail "no .venv in $REPO_ROOT (install the project first)"
CTRLORA_LOADERS_DIR=$DIR .venv/bin/python -m pytest -q -rs tests/models/test_export_loaders.py "$@"
