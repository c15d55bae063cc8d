#!/usr/bin/env bash
# Every CUDA measurement in one go, for a lent GPU machine: the gpu-marked tests, then the
# classify, training and end-to-end benchmarks (each appends its section to docs/benchmarks.md).
#   bash scripts/bench/gpu_all.sh [LOGDIR]    # PY=python3; ONLY="tests e2e_large" runs a subset
set -uo pipefail
cd "$(dirname "$0")/../.."
export NO_ALBUMENTATIONS_UPDATE=1 ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG=${1:-/tmp/cellclf-gpu-logs}
mkdir -p "$LOG"
fails=0
ONLY=" ${ONLY:-tests classify train e2e_small e2e_large infer_large tiling} "
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOG/NAME.log (if in $ONLY)
  local name=$1 limit=$2; shift 2
  [[ "$ONLY" == *" $name "* ]] || return 0
  echo "=== $name ($(date +%T)): $*"
  if ! timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"; then
    echo "!!! $name failed or timed out"; fails=$((fails + 1))
  fi
  cp docs/benchmarks.md "$LOG/benchmarks.md" 2>/dev/null || true
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step tests 240 $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu_stage.py tests/test_train.py
step classify 120 $PY scripts/bench/classify.py --n 8192
step train 200 $PY scripts/bench/train.py --steps 150 --batch 1024 --workers 8 --size 8192
step e2e_small 120 $PY scripts/bench/e2e.py --width 16000 --height 12000
step e2e_large 420 $PY scripts/bench/e2e.py --width 100000 --height 80000 --compare-decode
# the whole cellclf infer job (outputs + review store) beside run_slide on the same 8-GP slide
step infer_large 400 $PY scripts/bench/infer.py --width 100000 --height 80000 --rounds 1 \
    --runs run_slide:fp32,infer:fp32 --backend auto
step tiling 600 $PY scripts/bench/tiling.py --workers "$(nproc)"
echo "=== done, $fails failed"
