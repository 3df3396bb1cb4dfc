#!/usr/bin/env bash
# The GPU figures of the SD 1.5 path in one run (under 5 minutes on one GPU; every benchmark is
# bounded by `timeout`), or the same chain at tiny sizes on a CPU (`--smoke`, the test of this
# script):
#   1. adapter vs full ControlNet training step: time and peak memory, SD 1.5 512² batch 4, under
#      bf16 autocast and under the 16gb_no_bnb memory preset (frozen weights in bf16, checkpointing)
#   2. the reference recipe (512², batch 1, rank 128) under every training memory option / preset
#   3. the memory presets at batch 4
#   4. batched vs sequential multi-condition sampling at N = 1, 2, 3; images/s at 20 steps
# then benchmarks/gpu_report.py merges them into $OUT/<card>.json (also benchmarks/results/) and
# $OUT/table.md (the rows for benchmarks/README.md).
#
# The device machine has torch, peft, accelerate and transformers but not diffusers; the pinned
# wheels travel in .whl/ (git-ignored). Here, once (pure-Python wheels, any platform):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2
# Then through the device tool:  run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=420)
# Without bitsandbytes on the machine the `16gb` preset (8-bit AdamW) is recorded as skipped.
# ONLY=name,name runs a subset (names as in the log: adapter_vs_full, adapter_vs_full_16gb,
# memory_presets_b1, memory_presets_b4, sampling_speed); MP1_VARIANTS overrides the b1 variants.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
if [ "$SMOKE" = 1 ]; then
  OUT="${OUT:-$(mktemp -d)}"
  PY="${PYTHON:-.venv/bin/python}"
  [ -x "$PY" ] || PY=python3
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
else
  OUT="${OUT:-benchmarks/out}"
  PY="${PYTHON:-python3}"
  # the project's pinned diffusers (and peft) travel as wheels; install whatever is carried
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
mkdir -p "$OUT"
"$PY" -c "import diffusers, peft" || { echo "diffusers/peft missing: carry .whl/ (see the header)"; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SMOKE" = 1 ]; then
  CARD="cpu smoke"
  DEV=(--device cpu)
  AVF=(--preset tiny --dtype fp32 --batch 2 --rank 8 --steps 1 --warmup 1)
  AVF16=(--preset tiny --memory-preset 16gb_no_bnb --batch 2 --rank 8 --steps 1 --warmup 1)
  MP1=(--preset tiny --rank 8 --batch 1 --steps 1 --warmup 1 --variants fp32,ckpt,preset_16gb_no_bnb,preset_16gb)
  MP4=(--preset tiny --rank 8 --batch 4 --steps 1 --warmup 1 --variants preset_16gb_no_bnb,preset_16gb)
  SAMPLING=(--preset tiny --dtype fp32 --steps 1 --sampling-steps 2 --images 2)
  LIMIT=900  # a shared CPU can be slow; nothing is leased
else
  CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  CARD="${CARD:-unknown GPU}"
  DEV=(--device cuda)
  AVF=(--preset sd15 --dtype bf16 --batch 4 --rank 128 --steps 5 --warmup 2)
  AVF16=(--preset sd15 --memory-preset 16gb_no_bnb --batch 4 --rank 128 --steps 5 --warmup 2)
  MP1=(--preset sd15 --resolution 512 --rank 128 --batch 1 --steps 5 --warmup 2)
  MP4=(--preset sd15 --resolution 512 --rank 128 --batch 4 --steps 3 --warmup 2 --variants bf16_ckpt,preset_16gb_no_bnb,preset_16gb)
  SAMPLING=(--preset sd15 --resolution 512 --dtype bf16 --steps 10 --sampling-steps 20 --images 4)
  LIMIT="${GPU_BENCH_LIMIT:-100}"   # per benchmark (memory_presets_b1: 1.5x); expected total ~3 min on an H100
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi ($CARD)"
  "$PY" -c "import torch, diffusers, peft, accelerate, transformers as t; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'transformers', t.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

FAILED="$OUT/.failed"
rm -f "$FAILED"
if [ -n "${MP1_VARIANTS:-}" ]; then MP1+=(--variants "$MP1_VARIANTS"); fi
bench() {  # name, seconds, then the command; the limit keeps one hang from eating the lease
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" --out "$OUT/$name.json" > /dev/null || { echo "!!! $name failed"; echo "$name" >> "$FAILED"; }
  echo "=== $name: $((SECONDS - t0)) s"
}
{
  bench adapter_vs_full "$LIMIT" "$PY" benchmarks/adapter_vs_full.py "${DEV[@]}" "${AVF[@]}"
  bench adapter_vs_full_16gb "$LIMIT" "$PY" benchmarks/adapter_vs_full.py "${DEV[@]}" "${AVF16[@]}"
  bench memory_presets_b1 $((LIMIT * 3 / 2)) "$PY" benchmarks/memory_presets.py "${DEV[@]}" "${MP1[@]}"
  bench memory_presets_b4 "$LIMIT" "$PY" benchmarks/memory_presets.py "${DEV[@]}" "${MP4[@]}"
  bench sampling_speed "$LIMIT" "$PY" benchmarks/sampling_speed.py "${DEV[@]}" "${SAMPLING[@]}"
} 2>&1 | tee "$OUT/log.txt"

RESULTS=(--results benchmarks/results)
[ "$SMOKE" = 1 ] && RESULTS=()
"$PY" benchmarks/gpu_report.py "$OUT" --card "$CARD" "${RESULTS[@]}"
report=$?
if [ "$SMOKE" = 0 ]; then  # at most 8 files come back from the device tool: the versions go into the log
  cat "$OUT/gpu.txt" >> "$OUT/log.txt" && rm -f "$OUT/gpu.txt"
fi
[ -n "${ONLY:-}" ] && report=0  # a subset is missing the others by design
echo "results: $OUT"
[ ! -e "$FAILED" ] && [ "$report" = 0 ]
