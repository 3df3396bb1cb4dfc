#!/usr/bin/env bash
# One-shot GPU run of the benchmarks on the device machine (it has torch, peft, accelerate and
# transformers, but no diffusers: the diffusers wheel travels in .whl/, git-ignored).
#
# Here, once (pure-Python wheel, any platform):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2
# (peft is there already, but its version is unknown; the project pins 0.21.2)
# Then through the device tool:  run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=600)
# Results: $OUT/*.json (+ gpu.txt, log.txt); copy the figures into benchmarks/README.md with the card.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"

# the project's pinned diffusers (and peft) travel as wheels; install whatever is carried
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import diffusers, peft" || { echo "diffusers/peft missing: carry .whl/ (see the header)"; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, diffusers, peft, accelerate, transformers as t; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'transformers', t.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

FAILED=/tmp/ctrlora_bench_failed
rm -f "$FAILED"
bench() {  # name, then the command; each bounded so one hang cannot eat the lease
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout 240 "$@" --out "$OUT/$name.json" > /dev/null || { echo "!!! $name failed"; touch "$FAILED"; }
  echo "=== $name: $((SECONDS - t0)) s"
}
{
  # SD 1.5 scale, 512x512 (64x64 latents): adapter (rank 128) vs full ControlNet training
  bench adapter_vs_full_sd15_bf16_b8 "$PY" benchmarks/adapter_vs_full.py --preset sd15 --device cuda --dtype bf16 --batch 8 --steps 10 --warmup 3
  bench adapter_vs_full_sd15_fp32_b4 "$PY" benchmarks/adapter_vs_full.py --preset sd15 --device cuda --dtype fp32 --batch 4 --steps 10 --warmup 3
  # embed cache vs on-the-fly encoding (tiny preset, synthetic data) on the GPU
  bench embed_cache_cuda_synthetic "$PY" benchmarks/embed_cache.py --synthetic --device cuda --batch 32 --steps 20 --warmup 3 --rounds 2
} 2>&1 | tee "$OUT/log.txt"
for f in "$OUT"/*.json; do
  [ -f "$f" ] && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], json.dumps(d.get('ratios') or {'step_s': d.get('step_s'), 'ratio': d.get('ratio_on_the_fly_over_cached')}))" "$f"
done
[ ! -e "$FAILED" ]
