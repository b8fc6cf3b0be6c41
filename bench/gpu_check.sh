#!/usr/bin/env bash
# Every GPU check in one run (< 8 minutes on one H100/H200); the table lands in $OUT/gpu_check.md.
#   1. parity: the tiny THUDM goldens in fp32 on the GPU (eager and sdpa), and bf16 agreement
#   2. train step: LoRA r=8 forward+backward tok/s and peak memory at the real 6B shape,
#      sdpa (ours) vs eager (the reference math), in the same run
#   3. decode: tokens/s at batch 1 and 8, adapter unmerged vs merged vs plain generate
#
# Run through the device tool from the repo root, carrying the goldens (../shared does not travel):
#   mkdir -p .shared && cp -r ../shared/fixtures .shared/ && echo /.shared/ >> .git/info/exclude
#   device run: carry [".shared"], command "bash bench/gpu_check.sh"
# The GPU image lacks `datasets`; nothing here imports it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export INSTRUCTGLM_SHARED=${INSTRUCTGLM_SHARED:-$PWD/.shared}
PY=${PY:-python3}
table="$OUT/gpu_check.md"
{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} > "$table"

step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "## $name" >> "$table"
  timeout "$limit" "$@" >> "$table" 2> "$OUT/$name.err" || echo "FAILED ($name, exit $?): see $name.err" >> "$table"
}

step parity 90 $PY bench/gpu_parity.py
step train_step 180 $PY bench/model_step.py --device cuda --real-shape
step decode 150 $PY bench/decode_speed.py --device cuda --real-shape
cat "$table"
