#!/usr/bin/env bash
# The one GPU script: builds fastvlp, runs the CUDA tests, then every GPU benchmark, most
# important first; results land in bench/results/<gpu>/. Where $OUT is set (the device
# machine), logs and results are packed into $OUT/gpu.tar.gz after every step, so a run
# stopped early still returns what it measured.
#
#   bash bench/gpu.sh                    # everything
#   BUDGET_S=420 bash bench/gpu.sh       # stop starting steps after 420 s; each is cut at what is left
#   SKIP_SANITIZER=1 bash bench/gpu.sh
#   ONLY="bench-e2e bench-attention" bash bench/gpu.sh   # the build, then only the steps named
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-}
BUDGET_S=${BUDGET_S:-0}
ONLY=${ONLY:-}
LOG_DIR=bench/results/logs
mkdir -p "$LOG_DIR"
failures=()
started=$(date +%s)

seconds_left() {
  if [ "$BUDGET_S" -gt 0 ]; then echo $((BUDGET_S - ($(date +%s) - started))); else echo 100000; fi
}

pack() {  # everything measured so far, in one file (the device machine returns few files)
  if [ -n "$OUT" ]; then tar czf "$OUT/gpu.tar.gz.tmp" bench/results && mv "$OUT/gpu.tar.gz.tmp" "$OUT/gpu.tar.gz"; fi
}

step() {  # step NAME CAP_S COMMAND...: run under min(CAP_S, time left), log, remember failures, keep going
  local name=$1 cap=$2; shift 2
  if [ -n "$ONLY" ] && [ "$name" != build ] && [[ " $ONLY " != *" $name "* ]]; then echo "=== $name: not in ONLY"; return; fi
  local left; left=$(seconds_left)
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then echo "=== $name: skipped, out of time"; failures+=("$name(skipped)"); return; fi
  echo "=== $name (at most ${cap}s)"
  local begin; begin=$(date +%s)
  if timeout --kill-after=10 "$cap" "$@" >"$LOG_DIR/$name.log" 2>&1; then
    tail -n 25 "$LOG_DIR/$name.log"
  else
    tail -n 60 "$LOG_DIR/$name.log"; failures+=("$name")
  fi
  echo "--- $name took $(($(date +%s) - begin))s"
  pack
}

train_step() {  # the paper's 6-r50 model on 800x1333-class images: batch 32, or the largest both backends fit
  local batch
  for batch in 32 16 8 4; do
    if $PYTHON -m fastvlp.bench.train_step --preset e2e-vlp-6-r50 --image-size 800x1216 --batch-size $batch \
         --amp --repeats 10 >"$LOG_DIR/train-step-b$batch.log" 2>&1; then
      tail -n 12 "$LOG_DIR/train-step-b$batch.log"; return 0
    fi
    grep -q "OutOfMemoryError" "$LOG_DIR/train-step-b$batch.log" || { tail -n 40 "$LOG_DIR/train-step-b$batch.log"; return 1; }
    echo "batch $batch does not fit: trying a smaller one"
  done
  return 1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee "$LOG_DIR/gpu.txt" || true
if [ -z "${FASTVLP_CUDA_ARCHS:-}" ]; then  # build for this card only: a third of the compile time
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
  [ -n "$cap" ] && export FASTVLP_CUDA_ARCHS=$cap
fi
step build 300 $PYTHON -m pip install --no-build-isolation --no-deps -e .
$PYTHON -c "import fastvlp, torch, triton; print(fastvlp.build_info()); print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$LOG_DIR/gpu.txt"
# Compiling and tuning the Triton kernels' variants is most of the tests' time: spread it over the cores.
parallel=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n 8")
step cuda-tests 200 $PYTHON -m pytest -q -m cuda -p no:cacheprovider $parallel tests
export PYTHON LOG_DIR; export -f train_step
# What the committed results lack comes first: the attention host-time diagnosis, the attention scenarios
# with the current kernels (FlexAttention included), the end-to-end query time and generation; then the
# training step and the solver, measured in earlier runs.
step bench-attention-overhead 90 $PYTHON -m fastvlp.bench.attention_overhead
step bench-attention 300 $PYTHON -m fastvlp bench attention
step bench-e2e 400 $PYTHON -m fastvlp bench e2e --device cuda --image-sizes 448x448,448x746,600x1000,800x1333 \
  --batch-size 1 --repeats 20 --amp --compile
step bench-generation 200 $PYTHON -m fastvlp bench generation --preset e2e-vlp-6-r50 --device cuda --batch-size 16 \
  --max-length 20 --repeats 5
step bench-train-step 300 bash -c train_step
step bench-lsap 150 $PYTHON -m fastvlp bench lsap --device cuda
if [ -z "${SKIP_SANITIZER:-}" ] && command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer-memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 1 $PYTHON -m pytest -q -x tests/test_lsap_cuda.py
  step sanitizer-racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 1 $PYTHON -m pytest -q -x -k "small or ragged" tests/test_lsap_cuda.py
fi

device=$($PYTHON -c "from fastvlp.bench.common import device_name; print(device_name('cuda'))" 2>/dev/null)
echo "results: bench/results/$device/ (logs: $LOG_DIR/)"
pack
if [ ${#failures[@]} -gt 0 ]; then echo "FAILED: ${failures[*]}"; exit 1; fi
