#!/usr/bin/env bash
# The one GPU script: builds fastvlp, runs the CUDA tests (the solver's also under
# compute-sanitizer), then every GPU benchmark; results land in bench/results/<gpu>/.
# Where $OUT is set (the device machine), logs and results are copied there too.
#
#   bash bench/gpu.sh              # everything
#   SKIP_SANITIZER=1 bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-}
LOG_DIR=${OUT:-bench/results}/logs
mkdir -p "$LOG_DIR"
failures=()

step() {  # step NAME COMMAND...: run, log, remember failures, keep going
  local name=$1; shift
  echo "=== $name"
  if "$@" >"$LOG_DIR/$name.log" 2>&1; then
    tail -n 25 "$LOG_DIR/$name.log"
  else
    tail -n 60 "$LOG_DIR/$name.log"; failures+=("$name")
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
step build $PYTHON -m pip install --no-build-isolation --no-deps -e .
$PYTHON -c "import fastvlp, torch; print(fastvlp.build_info()); print('torch', torch.__version__)"
step cuda-tests $PYTHON -m pytest -q -m cuda tests
if [ -z "${SKIP_SANITIZER:-}" ] && command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer-memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PYTHON -m pytest -q -x tests/test_lsap_cuda.py
  step sanitizer-racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PYTHON -m pytest -q -x -k "small or ragged" tests/test_lsap_cuda.py
fi
step bench-lsap $PYTHON -m fastvlp bench lsap --device cuda
step bench-attention $PYTHON -m fastvlp bench attention
# The paper's 6-r50 model on 800x1333-class images: batch 32, or the largest batch both backends fit.
for batch in 32 16 8 4; do
  if $PYTHON -m fastvlp.bench.train_step --preset e2e-vlp-6-r50 --image-size 800x1216 --batch-size $batch \
       --amp --repeats 10 >"$LOG_DIR/bench-train-step-b$batch.log" 2>&1; then
    tail -n 8 "$LOG_DIR/bench-train-step-b$batch.log"; break
  fi
  if ! grep -q "OutOfMemoryError" "$LOG_DIR/bench-train-step-b$batch.log"; then
    tail -n 40 "$LOG_DIR/bench-train-step-b$batch.log"; failures+=("bench-train-step"); break
  fi
  echo "batch $batch does not fit: trying a smaller one"
done

step bench-generation $PYTHON -m fastvlp bench generation --preset e2e-vlp-6-r50 --device cuda --batch-size 16 \
  --max-length 20 --repeats 5
step bench-e2e $PYTHON -m fastvlp bench e2e --device cuda --image-sizes 448x448,448x746,600x1000,800x1333 \
  --batch-size 1 --repeats 20 --amp --compile

device=$($PYTHON -c "from fastvlp.bench.common import device_name; print(device_name('cuda'))")
if [ -n "$OUT" ] && [ -d "bench/results/$device" ]; then
  mkdir -p "$OUT/results" && cp bench/results/"$device"/* "$OUT/results/" 2>/dev/null
fi
echo "results: bench/results/$device/"
if [ ${#failures[@]} -gt 0 ]; then echo "FAILED: ${failures[*]}"; exit 1; fi
