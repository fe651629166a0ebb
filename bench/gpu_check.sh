#!/usr/bin/env bash
# The prepared device check (issue 12): finishes within 10 minutes on one H200.
#   bench/gpu_check.sh                      # on the GPU
#   bench/gpu_check.sh --device cpu --tiny  # the same steps as a quick CPU dry run
# Prints each part's figures; record them in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
TINY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=(--tiny); shift ;;
    *) echo "gpu_check.sh: unknown argument $1; allowed: --device cuda|cpu, --tiny" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
# A part that misses its target exits 1: note it and go on, so that one miss does not cost
# the remaining parts their (scarce) device time; the script exits 1 at the end if any did.
MISSED=()
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 1. tests that exercise CUDA (selected by name; none may exist yet)"
if [ "$DEVICE" = cuda ]; then
  "$PY" -m pytest -q -p no:cacheprovider -k cuda tests || [ $? -eq 5 ]
else
  echo "skipped on $DEVICE"
fi

echo "== 2. bench/step_overhead.py --device $DEVICE"
if [ ${#TINY[@]} -gt 0 ]; then
  "$PY" bench/step_overhead.py --device "$DEVICE" --inputs 256 --hidden 256 --batch 32 --steps 3 --repeats 1 --warmup 1 || MISSED+=(step_overhead)
else
  "$PY" bench/step_overhead.py --device "$DEVICE" || MISSED+=(step_overhead)
fi

echo "== 3. bench/local_layer.py --device $DEVICE"
if [ ${#TINY[@]} -gt 0 ]; then
  "$PY" bench/local_layer.py --device "$DEVICE" --batch 4 --size 24 --maps 4 --kernel 8 --stride 4 --steps 1 --repeats 1 --no-dense || MISSED+=(local_layer)
else
  "$PY" bench/local_layer.py --device "$DEVICE" || MISSED+=(local_layer)
fi

echo "== 4. 20 bf16 steps of the largest lbann-ae that fits"
"$PY" bench/_bf16_steps.py --device "$DEVICE" "${TINY[@]}" || MISSED+=(bf16_steps)

if [ ${#MISSED[@]} -gt 0 ]; then
  echo "== parts that missed their target or failed: ${MISSED[*]}"
  exit 1
fi
echo "== every part met its target"
