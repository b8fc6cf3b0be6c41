#!/usr/bin/env bash
# Every GPU check in one run (< 8 minutes on one H100/H200); the table lands in $OUT/gpu_check.md.
#   1. parity: the tiny THUDM goldens of ChatGLM-6B and ChatGLM3-6B in fp32 on the GPU (eager, sdpa,
#      flex_attention), bf16 agreement, the goldens' training loss and gradients, packed rows vs alone
#   2. train: bench/gpu_train.py at the real 6B shapes, random bf16 weights, LoRA r=8: the plain HF + peft
#      path vs ours (packing + labelled-only logits, sdpa / flex_attention), batch 2 x 320, 32 x 320 and
#      the best batch in 80 GB, with and without gradient checkpointing, MFU; one ChatGLM3-6B-shape run
#   3. train step: LoRA forward+backward tok/s and peak memory at the 6B shape, sdpa vs eager (bench/model_step.py)
#   4. decode: tokens/s at batch 1 and 8, adapter unmerged vs merged vs plain generate
#   5. serve engine: decode tokens/s at the 6B shape through the batching engine, 1/8/32 concurrent requests,
#      static (CUDA-graph) vs dynamic cache (bench/serve_load.py)
# The whole script keeps to GPU_CHECK_SECONDS (default 470): each step gets at most its own limit and what
# is left; gpu_train.py gets a time budget of its own and lists what it skipped.
#
# Run through the device tool from the repo root, carrying the goldens (../shared does not travel). No step
# builds a tokenizer (sentencepiece is imported only then), so the image's packages suffice; sentencepiece wheels
# under /.whl/ (git-ignored) are installed for the run only if present and the image lacks it:
#   mkdir -p .shared && cp -r ../shared/fixtures .shared/ && echo /.shared/ >> .git/info/exclude
#   for v in 3.10 3.11 3.12; do pip download 'sentencepiece>=0.2' --only-binary=:all: --no-deps \
#     --python-version $v --platform manylinux2014_x86_64 -d .whl; done
#   device run: carry [".shared", ".whl"], command "bash bench/gpu_check.sh", timeout_s 540
# Dry run on a CPU (every step starts and finishes at tiny shapes; for typos, not numbers):
#   GPU_CHECK_DEVICE=cpu OUT=/tmp/gpu_check bash bench/gpu_check.sh
# The GPU image lacks `datasets`; nothing here imports it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# the goldens: the carried .shared/ on a lent machine, else ../shared beside the repo (a local dry run)
if [[ -d .shared ]]; then default_shared=$PWD/.shared; else default_shared=$(dirname "$PWD")/shared; fi
export INSTRUCTGLM_SHARED=${INSTRUCTGLM_SHARED:-$default_shared}
PY=${PY:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_SECONDS:-470}
START=$SECONDS
table="$OUT/gpu_check.md"
{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (device $DEVICE)"
  $PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
} > "$table"

# sentencepiece from the carried wheels when the image lacks it, into a temporary dir (not the image's Python)
if [[ -d .whl ]] && ! $PY -c "import sentencepiece" 2> /dev/null; then
  DEPS=$(mktemp -d)
  trap 'rm -rf "$DEPS"' EXIT
  if $PY -m pip install --quiet --no-index --find-links .whl --target "$DEPS" sentencepiece > "$OUT/deps.log" 2>&1; then
    export PYTHONPATH="$DEPS:$PYTHONPATH"
    echo "sentencepiece installed from .whl/ for this run" >> "$table"
  else
    echo "sentencepiece is missing and .whl/ has none for this Python (see deps.log); no step needs it" >> "$table"
  fi
fi

left() { echo $((BUDGET - (SECONDS - START))); }

step() {  # name, seconds, command...
  local name=$1 limit=$2 remaining; shift 2
  remaining=$(left)
  (( remaining < limit )) && limit=$remaining
  echo "## $name" >> "$table"
  if (( limit < 20 )); then
    echo "SKIPPED ($name): the ${BUDGET} s budget is spent" >> "$table"
    return
  fi
  local began=$SECONDS
  timeout "$limit" "$@" >> "$table" 2> "$OUT/$name.err" || echo "FAILED ($name, exit $?): see $name.err" >> "$table"
  echo "($name: $((SECONDS - began)) s)" >> "$table"
}

if [[ $DEVICE == cpu ]]; then
  step parity 240 $PY bench/gpu_parity.py --device cpu
  step train 240 $PY bench/gpu_train.py --device cpu --tiny --budget-s 60 --simulate-oom-tokens 5000 --out-json "$OUT/gpu_train.json"
  step train_step 240 $PY bench/model_step.py --device cpu --steps 1
  step decode 240 $PY bench/decode_speed.py --device cpu --new_tokens 4 --repeats 1
  step serve_engine 240 $PY bench/serve_load.py --decode --device cpu
else
  step parity 120 $PY bench/gpu_parity.py --device cuda
  # leave ~220 s for the train step, decode and the serve engine after it
  train_budget=$(( $(left) - 250 )); (( train_budget > 200 )) && train_budget=200
  step train $((train_budget + 60)) $PY bench/gpu_train.py --device cuda --budget-s "$train_budget" --out-json "$OUT/gpu_train.json"
  step train_step 90 $PY bench/model_step.py --device cuda --real-shape --steps 3
  step decode 90 $PY bench/decode_speed.py --device cuda --real-shape --repeats 3
  step serve_engine 90 $PY bench/serve_load.py --device cuda --real-shape
fi
echo "total: $((SECONDS - START)) s of ${BUDGET} s" >> "$table"
cat "$table"
